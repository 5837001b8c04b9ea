"""bench/policy_breakdown.py's arithmetic and the oracle's score terms, against hand computations and the oracle's
own score; reading a logged image panel back into its tiles (bench/reproduce_report.py's extra-object count and
over-optimization flag)."""

import shutil

import numpy as np
import torch
import pytest

from bench.policy_breakdown import group_variance, kind_of, mixed_groups
from drm_ray.toy.oracle import oracle_scores, score_terms
from drm_ray.toy.world import scene_batch


def test_score_terms_add_up_to_the_oracle_score():
    captions, images = scene_batch(3, 0, 6)
    result = oracle_scores(images, captions)
    total = sum(score_terms(result).values())
    np.testing.assert_allclose(total, result.score, atol=1e-12)


def test_group_variance_by_hand():
    # groups (1, 3) and (5, 5): population variances 1 and 0 -> mean 0.5
    assert group_variance(np.array([1.0, 3.0, 5.0, 5.0]), 2) == 0.5
    # one group of four: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> 1.25
    assert group_variance(np.array([1.0, 2.0, 3.0, 4.0]), 4) == 1.25


def test_mixed_groups_counts_groups_with_both_outcomes():
    correct = np.array([True, False, True, True, False, False])
    assert mixed_groups(correct, 2) == 1 / 3


def test_kind_of_caption():
    assert kind_of("two red circles") == "two"
    assert kind_of("a blue square on the left") == "square"
    assert kind_of("a white triangle in the center") == "triangle"


def test_grid_tiles_reads_back_the_images_of_an_image_grid():
    from PIL import Image

    from drm_ray.rl_setup import grid_tiles, image_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(18, 8, 8, 3), dtype=np.uint8)  # 18 tiles: 5 columns, the last row partial
    grid = image_grid([Image.fromarray(a) for a in images])
    assert grid.size == (5 * 8, 4 * 8)
    assert np.array_equal(grid_tiles(grid, 18, 8), images)
    assert np.array_equal(grid_tiles(image_grid([Image.fromarray(a) for a in images], 3), 18, 8, columns=3), images)


def test_gradient_snr_recovers_a_known_signal_and_noise():
    from bench.gradient_snr import snr

    # g_i = mu + N(0, sigma^2 I) in P dims: E|g_i - mean|^2 = P sigma^2, so the batch whose mean has noise as large as
    # the signal is P sigma^2 / |mu|^2 = 2000 * 1 / 4 = 500 groups
    rng = np.random.default_rng(0)
    mu = np.zeros(2000)
    mu[:4] = 1.0
    r = snr(mu + rng.standard_normal((400, 2000)))
    assert abs(r["mu2"] - 4.0) < 0.5 and abs(r["trace"] - 2000) < 20
    assert 400 < r["n_star"] < 650
    assert 0.05 < r["mu2_se"] < 0.5 and abs(r["mu2"] - 4.0) < 3 * r["mu2_se"]  # the s.e. covers the truth
    assert r["zero_groups"] == 0.0
    assert snr(rng.standard_normal((400, 2000)))["mu2"] < 0.5  # no signal: |mu|^2 estimated near 0, not T / N = 5


def test_gain_verdict_needs_two_standard_errors_over_seeds():
    from bench.reproduce_report import gain_text

    # gains 0.010, 0.012, 0.014: mean 0.012, sd 0.002, s.e. 0.002 / sqrt(3) = 0.00115 -> 0.012 > 0.0023: clear
    text, ok = gain_text(np.array([0.010, 0.012, 0.014]))
    assert ok and text.startswith("+0.0120 +- 0.0012 s.e. over 3 seed(s)") and "NOT CLEAR" not in text
    # gains 0.02, -0.01: mean 0.005, s.e. 0.015: not clear; one seed is never clear (no standard error)
    assert not gain_text(np.array([0.02, -0.01]))[1]
    assert not gain_text(np.array([0.05]))[1]


def test_ceiling_learning_rate_follows_its_batch_and_a_mismatch_is_named(tmp_path, capsys):
    from bench.reproduce import main
    from bench.reproduce_report import ceiling_lr

    p = dict(rl_lr=2e-3, ceiling_groups=(4, 64), ceiling_lrs=(2e-3, 1e-3))
    assert (ceiling_lr(p, 4), ceiling_lr(p, 64)) == (2e-3, 1e-3)
    # parameters written before ceiling_lrs existed ran every batch at the rl stage's rate
    assert ceiling_lr(dict(rl_lr=5e-4, ceiling_groups=(4, 64)), 64) == 5e-4
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--stages", "report", "--set", "ceiling_lrs=[0.001]"])
    assert "one learning rate per entry of ceiling_groups [4, 64]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _write_summary(run, iters, oracle, drm, forwards=128, x0=0):
    import json

    run.mkdir(parents=True)
    ev = [{"iteration": it, "eval/oracle_score": o, "eval/oracle_correct": 0.5, "eval/drm_score": d,
           "policy_forwards": forwards * it, "x0_forwards": x0 * it} for it, o, d in zip(iters, oracle, drm)]
    (run / "summary.json").write_text(json.dumps({"eval": ev}))


def test_drm_claim_against_the_ceiling_grpo_is_read_from_the_runs(tmp_path):
    from bench.reproduce_report import ceiling_drm_part, ceiling_run, rl_run

    p = dict(prompts=16, rl_seeds=3, rl_lr=2e-3, ceiling_seeds=3, ceiling_groups=(4,), ceiling_lrs=(2e-3,),
             ceiling_drm_groups=(4,))
    ceil_iters, rl_iters = [0, 10, 20, 30, 40], list(range(0, 45, 5))
    for seed, gain in enumerate([0.03, 0.04, 0.05]):  # GRPO with the DRM: finals 0.83, 0.84, 0.85 -> mean 0.84
        _write_summary(ceiling_run(tmp_path, 4, seed, "drm"), ceil_iters,
                       [0.80 + gain * it / 40 for it in ceil_iters], [1.0 + it / 40 for it in ceil_iters])
        # Step-GRPO with the DRM: 0.80 + 0.0025 * it, so it reaches 0.84 at iteration 16: 40 / 16 = 2.5x
        _write_summary(rl_run(tmp_path, "step_grpo", "drm", seed), rl_iters, [0.80 + 0.0025 * it for it in rl_iters],
                       [1.0 + it / 10 for it in rl_iters])
    metrics = {}  # Step-GRPO's runs alone suffice: the rl stage's GRPO (rl_algos) need not have run
    text, verdict = ceiling_drm_part(tmp_path, p, metrics)
    assert verdict.startswith("HELD") and "at iteration 16.0 vs GRPO's 40.0 (ratio 2.5x" in verdict
    assert abs(metrics["ceiling/iteration_ratio_drm"] - 2.5) < 1e-9
    assert "| 20 | 0.820 +- 0.005 | 0.850 +- 0.000 | +1.500 / +3.000 |" in text  # seeds 0.815, 0.820, 0.825 at it. 20
    # Step-GRPO falling back below GRPO's final by the end: the claim does not hold, however fast it got there
    for seed in range(3):
        run = rl_run(tmp_path, "step_grpo", "drm", seed)
        shutil.rmtree(run)
        _write_summary(run, rl_iters, [0.80 + 0.0025 * it for it in rl_iters[:-1]] + [0.79], [1.0] * 9)
    assert ceiling_drm_part(tmp_path, p, {})[1].startswith("DID NOT HOLD")
    # a GRPO that does not clearly move the oracle leaves the claim undecided
    for seed, gain in enumerate([0.02, -0.02, 0.0]):
        run = ceiling_run(tmp_path, 4, seed, "drm")
        shutil.rmtree(run)
        _write_summary(run, ceil_iters, [0.80 + gain * it / 40 for it in ceil_iters], [1.0] * 5)
    assert ceiling_drm_part(tmp_path, p, {})[1].startswith("UNDECIDED")
    assert ceiling_drm_part(tmp_path, dict(p, ceiling_drm_groups=()), {}) == ("", None)


def test_readings_follow_the_numbers():
    from bench.reproduce_report import direction, drm_reading, oracle_reading

    rise, fall, flat = np.array([0.010, 0.012, 0.014]), np.array([-0.010, -0.012, -0.014]), np.array([0.01, -0.01])
    assert [direction(v) for v in (rise, fall, flat, np.array([0.5]))] == ["rose", "fell", "unclear", "unclear"]
    text = drm_reading(0.72, {"grpo": 0.2, "step_grpo": 3.0}, {"grpo": flat, "step_grpo": rise})
    assert "right 72% of the time" in text and "Step-GRPO moved the DRM's score of the panel by +3.000" in text
    assert "truth does not clearly rise (GRPO)" in text and "Step-GRPO raised the oracle clearly" in text
    text = drm_reading(0.72, {"grpo": 0.2, "step_grpo": 3.0}, {"grpo": flat, "step_grpo": fall})
    assert "(GRPO and Step-GRPO)" in text and "a clear fall" in text and "raised the oracle clearly" not in text
    assert "error being optimized" not in drm_reading(0.72, {"grpo": -0.1, "step_grpo": 0.5},
                                                      {"grpo": flat, "step_grpo": rise})
    # a larger GRPO batch with the same DRM: named only where it clearly raised the oracle
    text = drm_reading(0.72, {"grpo": 0.2, "step_grpo": 3.0}, {"grpo": flat, "step_grpo": flat}, {64: rise})
    assert "GRPO with the same DRM at 64 groups (256 trajectories / iteration) did raise the oracle clearly " \
           "(+0.0120 +- 0.0012 s.e. over 3 seed(s))" in text
    assert "did raise" not in drm_reading(0.72, {"grpo": 0.2, "step_grpo": 3.0}, {"grpo": flat, "step_grpo": flat},
                                          {64: flat})
    cases = {("rose", "unclear"): "per-step credit from the same reward moved the policy where one terminal",
             ("rose", "rose"): "both moved the policy", ("unclear", "rose"): "one terminal reward per trajectory "
             "moved the policy where per-step credit did not", ("unclear", "unclear"): "neither moved the policy"}
    pick = {"rose": rise, "unclear": flat}
    for (step, grpo), phrase in cases.items():
        text = oracle_reading({"grpo": pick[grpo], "step_grpo": pick[step]}, 17920, 5120)
        assert phrase in text and "(3.5x)" in text, (step, grpo, text)


def test_drm_claim_in_policy_forwards_against_a_larger_grpo_with_the_drm(tmp_path):
    from bench.reproduce_report import ceiling_drm_scale_part, ceiling_run, rl_run

    p = dict(prompts=16, rl_seeds=3, rl_lr=2e-3, ceiling_seeds=3, ceiling_groups=(4, 64), ceiling_lrs=(2e-3, 1e-3),
             ceiling_drm_groups=(4, 64))
    ceil_iters, rl_iters = [0, 10, 20, 30, 40], list(range(0, 45, 5))
    for seed, gain in enumerate([0.03, 0.04, 0.05]):  # GRPO with the DRM, 64 groups: finals 0.83-0.85, mean 0.84
        _write_summary(ceiling_run(tmp_path, 64, seed, "drm"), ceil_iters, [0.80 + gain * it / 40 for it in ceil_iters],
                       [1.0 + it / 40 for it in ceil_iters], forwards=2048)
        # Step-GRPO with the DRM: 0.80 + 0.0025 * it reaches 0.84 at iteration 16, 128 policy forwards per
        # iteration and no x0_hat: 2,048 against GRPO's 2048 x 40 = 81,920, 40x fewer
        _write_summary(rl_run(tmp_path, "step_grpo", "drm", seed), rl_iters, [0.80 + 0.0025 * it for it in rl_iters],
                       [1.0] * 9, forwards=128)
    metrics = {}
    text, [verdict], gains = ceiling_drm_scale_part(tmp_path, p, metrics)  # 4 groups belong to ceiling_drm_part
    assert list(gains) == [64] and np.allclose(gains[64], [0.03, 0.04, 0.05])
    assert verdict.startswith("HELD") and "below it" not in verdict
    assert "after about 2,048 policy forwards, it needs none for x0_hat" in verdict
    assert "81,920 (40.0x fewer" in verdict and abs(metrics["ceiling/grpo_drm_g64_forwards_ratio"] - 40) < 1e-9
    assert "| 20 | 0.820 +- 0.005 | +1.500 |" in text and "none of them for x0_hat" in text
    for seed in range(3):  # Step-GRPO falls back below GRPO's final by its end (its DRM's errors optimized)
        run = rl_run(tmp_path, "step_grpo", "drm", seed)
        shutil.rmtree(run)
        _write_summary(run, rl_iters, [0.80 + 0.0025 * it for it in rl_iters[:-1]] + [0.81], [1.0] * 9, forwards=128)
    verdict = ceiling_drm_scale_part(tmp_path, p, {})[1][0]
    assert verdict.startswith("DID NOT HOLD") and "where Step-GRPO is at 0.8100, below it)" in verdict
    for seed, gain in enumerate([0.02, -0.02, 0.0]):  # a GRPO that does not clearly move the oracle
        run = ceiling_run(tmp_path, 64, seed, "drm")
        shutil.rmtree(run)
        _write_summary(run, ceil_iters, [0.80 + gain * it / 40 for it in ceil_iters], [1.0] * 5, forwards=2048)
    assert ceiling_drm_scale_part(tmp_path, p, {})[1][0].startswith("UNDECIDED")
    assert ceiling_drm_scale_part(tmp_path, dict(p, ceiling_drm_groups=(4,)), {}) == ("", [], {})


def test_algorithm_claim_in_policy_forwards_against_a_larger_grpo(tmp_path, monkeypatch):
    import bench.reproduce_report as report
    from bench.reproduce_report import ceiling_run, ceiling_section, rl_run

    monkeypatch.setattr(report, "panel_extra_objects", lambda out, run: None)  # panels in MLflow: not written here

    p = dict(prompts=16, rl_seeds=3, rl_lr=2e-3, ceiling_seeds=3, ceiling_groups=(4, 64), ceiling_lrs=(2e-3, 1e-3),
             ceiling_branch_steps="0")
    ceil_iters, rl_iters = [0, 10, 20, 30, 40], list(range(0, 45, 5))

    def write(step_x0, step_slope):
        shutil.rmtree(tmp_path, ignore_errors=True)
        for seed, gain in enumerate([0.03, 0.04, 0.05]):
            # 4 groups: no clear gain; 64 groups (2048 rollout forwards per iteration): finals 0.83-0.85, mean 0.84
            _write_summary(ceiling_run(tmp_path, 4, seed), ceil_iters, [0.80 + (seed - 1) * 0.01 * it / 40
                                                                        for it in ceil_iters], [0.0] * 5)
            _write_summary(ceiling_run(tmp_path, 64, seed), ceil_iters, [0.80 + gain * it / 40 for it in ceil_iters],
                           [0.0] * 5, forwards=2048)
            _write_summary(rl_run(tmp_path, "step_grpo", "oracle", seed), rl_iters,
                           [0.80 + step_slope * it for it in rl_iters], [0.0] * 9, forwards=128, x0=step_x0)

    # Step-GRPO: 0.80 + 0.0025 * it reaches 0.84 at iteration 16, at (128 + 448) forwards per iteration: 9,216
    # against GRPO's 2048 x 40 = 81,920, 8.9x fewer
    write(448, 0.0025)
    metrics = {}
    result = ceiling_section(tmp_path, p, metrics)[1]
    assert result["verdict"] is None  # the 4-group GRPO does not clearly move: no verdict at equal batch
    [verdict] = result["compute_verdicts"]
    assert verdict.startswith("HELD") and "after about 9,216 policy forwards" in verdict and "81,920 (8.9x" in verdict
    assert abs(metrics["ceiling/g64_forwards_ratio"] - 81920 / 9216) < 1e-9
    write(8000, 0.0025)  # x0_hat forwards that cost more than GRPO's whole run: 16 x 8128 = 130,048
    assert ceiling_section(tmp_path, p, {})[1]["compute_verdicts"][0].startswith("DID NOT HOLD")
    write(448, 0.0005)  # never reaches 0.84 (0.82 at iteration 40)
    [verdict] = ceiling_section(tmp_path, p, {})[1]["compute_verdicts"]
    assert verdict.startswith("DID NOT HOLD") and "does not reach" in verdict


def test_drm_verdicts_judge_differences_by_the_paired_standard_error(tmp_path):
    """100 held-out pairs; the pretrained-init DRM ranks pairs 0-79 right at t < 950 and pairs 0-49 at t=950, the
    random-init DRM pairs 0-73 and 0-49. Each pair's pretrained-minus-random correctness averaged over the five t is
    0.8 for pairs 74-79 and 0 otherwise: gap 0.048, s.d. sqrt((6 * 0.752^2 + 94 * 0.048^2) / 99) = 0.19095, paired
    s.e. 0.019095 (2 s.e. = 0.038: HELD). Without per-pair margins the s.e. of two independent accuracies at 100 pairs,
    sqrt(2) * 0.5 / 10 = 0.0707 (2 s.e. = 0.141), does not separate them."""
    import json

    from bench.reproduce_report import TIMESTEPS, drm_section

    def write(init, right_below_950, margins=True):
        rows = []
        for t in TIMESTEPS:
            right = 50 if t == 950 else right_below_950
            m = [1.0] * right + [-1.0] * (100 - right)
            rows.append({"t": t, "accuracy": right / 100, "pairs": 100, **({"margins": m} if margins else {})})
        (tmp_path / "drm" / f"{init}-s0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "drm" / f"{init}-s0" / "eval.json").write_text(json.dumps(rows))

    write("pretrained", 80)
    write("random", 74)
    metrics = {}
    _, drm = drm_section(tmp_path, {"drm_seeds": 1}, metrics)
    assert metrics["drm/init_gap"] == pytest.approx(0.048) and metrics["drm/init_gap_se"] == pytest.approx(0.019095,
                                                                                                            abs=1e-6)
    assert drm["verdict"]["init"].startswith("HELD") and "paired over the 100 held-out pairs = 0.038" in \
        drm["verdict"]["init"]
    # t=0 minus t=950 per pair: 1 for pairs 50-79, else 0 -> s.d. sqrt((30 * 0.49 + 70 * 0.09) / 99), 2 s.e. 0.092
    assert drm["verdict"]["t"].startswith("HELD") and "= 0.092" in drm["verdict"]["t"]
    assert drm["verdict"]["bar"].startswith("MET")  # 0.80 at t=0 and t=750, and the init gap holds
    write("random", 74, margins=False)
    _, drm = drm_section(tmp_path, {"drm_seeds": 1}, metrics)
    assert drm["verdict"]["init"].startswith("DID NOT HOLD") and "independent accuracies = 0.141" in \
        drm["verdict"]["init"]
    assert drm["verdict"]["bar"].startswith("NOT MET")


def test_stepwise_verdict_prices_the_gain_in_whole_images(tmp_path):
    """Step-wise Sampling at k=2 gains +0.020 (3.3 s.e.) at 8 policy forwards per image; best-of-k gains +0.010 at
    k=2 and +0.030 at k=4: the first best-of-k to match is k=4, 32 forwards, 4.0x. Without k=4 none matches."""
    import json

    from bench.reproduce_report import stepwise_section

    def row(k, gain, forwards, drm):
        return {"k": k, "oracle": 0.8 + gain, "oracle_sem": 0.01, "oracle_gain": gain, "oracle_gain_sem": 0.006,
                "oracle_correct": 0.5, "score": 0.0, "rms": 0.1, "dssim": 0.5, "t": 0.01,
                "policy_forwards": forwards, "drm_forwards": drm}

    best_of = [row(1, 0.0, 8, 1), row(2, 0.01, 16, 2), row(4, 0.03, 32, 4)]
    data = {"drm": "a DRM", "images": 10, "rows": [row(1, 0.0, 8, 1), row(2, 0.02, 8, 15)], "best_of": best_of}
    (tmp_path / "stepwise.json").write_text(json.dumps(data))
    verdict = stepwise_section(tmp_path, {})[1]["verdict"]
    assert verdict.startswith("HELD: at k=2 the oracle grade changes by +0.0200 +- 0.0060")
    assert "first matches step-wise k=2's gain at k=4, 32 policy forwards per image, 4.0x" in verdict
    assert "(DRM forwards per image: 15 vs 4)" in verdict
    (tmp_path / "stepwise.json").write_text(json.dumps({**data, "best_of": best_of[:2]}))
    assert "no best-of-k up to k=2 (16 policy forwards per image) matches" in \
        stepwise_section(tmp_path, {})[1]["verdict"]


def test_report_prints_the_work_directorys_provenance_under_its_first_line(tmp_path):
    from bench.reproduce import QUICK
    from bench.reproduce_report import write_report

    (tmp_path / "PROVENANCE.md").write_text("The DRM runs were re-made with new pairs; the oracle runs were kept.\n")
    write_report(tmp_path, QUICK, {}, tmp_path / "docs" / "REPRODUCTION.md")
    lines = (tmp_path / "docs" / "REPRODUCTION.md").read_text().splitlines()
    assert lines[2].startswith("Written by") and lines[4] == ("The DRM runs were re-made with new pairs; the oracle "
                                                              "runs were kept.")
    assert "DRM stage not run." in lines


def test_overoptimization_is_read_back_from_the_panels_a_run_logged(tmp_path):
    """bench/reproduce_report.py's recomputation of the driver's flag with the oracle as the judge, from panels
    logged to a real MLflow store, against the oracle of the same images graded directly and scipy's paired t."""
    import json

    from mlflow.tracking import MlflowClient
    from scipy.stats import ttest_rel

    from bench.reproduce_report import panel_overoptimization
    from drm_ray.diffusion.sampling import to_pil
    from drm_ray.rl_setup import image_grid
    from drm_ray.toy.pairs import renders
    from drm_ray.toy.world import caption_texts

    caps = caption_texts()[:8]  # the toy panel: every caption in order
    right, wrong = renders(caps, 1, seed=0)[:, 0], renders(caps, 1, seed=0, mismatched=True)[:, 0]
    fallen = torch.cat([wrong[:4], right[4:]])  # half the panel now shows another caption's scene
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.log_param(run_id, "grpo.eval_panel_size", 8)
    # (iteration, panel, optimized reward): up and the oracle down; up and the oracle back; the oracle down alone
    evals = [(0, right, 0.0), (5, fallen, 1.0), (10, right, 1.0), (15, fallen, 0.1)]
    history = []
    for it, images, reward in evals:
        client.log_image(run_id, image_grid(to_pil(images)), f"panel/iter_{it:06d}.png")
        quantized = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in to_pil(images)])  # as the PNG holds it
        history.append({"iteration": it, "eval/reward": reward, "eval/reward_sem": 0.1,
                        "eval/oracle_score": float(oracle_scores(quantized, caps).score.mean())})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"mlflow_run_id": run_id, "eval": history}))

    got = panel_overoptimization(tmp_path, tmp_path / "run")
    assert [it for it, _, _ in got] == [5]
    before = oracle_scores(right.permute(0, 2, 3, 1).numpy(), caps).score
    after = oracle_scores(fallen.permute(0, 2, 3, 1).numpy(), caps).score
    _, change, se = got[0]
    assert change == pytest.approx(float(np.mean(after - before)), abs=0.01) and change < -0.1
    assert change / se == pytest.approx(ttest_rel(after, before).statistic, rel=0.05)
    # a run this store does not hold, or no store: nothing to read back
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"mlflow_run_id": "nope", "eval": history}))
    assert panel_overoptimization(tmp_path, tmp_path / "run") is None
    assert panel_overoptimization(tmp_path / "run", tmp_path / "run") is None
