"""bench/policy_breakdown.py's arithmetic and the oracle's score terms, against hand computations and the oracle's
own score; reading a logged image panel back into its tiles (bench/reproduce_report.py's extra-object count)."""

import numpy as np
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
