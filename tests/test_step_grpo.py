"""Step-GRPO through real local Ray, real Ray Train + DeepSpeed, on the tiny preset (the GRPO baseline runs as a
`ray job submit` job in test_cluster_job_submit.py: one job start-up covers both)."""

import json

import numpy as np
import pytest
import torch

from conftest import rl_config
from drm_ray.models.sd3 import build_tiny

pytestmark = pytest.mark.slow


@pytest.fixture
def drm_dir(tiny_drm_dir):
    return tiny_drm_dir


def _run(out, drm_dir, *overrides):
    from drm_ray.driver import StepGRPODriver

    driver = StepGRPODriver(rl_config(out, drm_dir, *overrides))
    summary = driver.run()
    return driver, summary


def test_first_iteration_is_worker_count_and_schedule_independent_and_synced(ray_session, tmp_path, drm_dir,
                                                                             one_iteration):
    one, s1 = one_iteration  # the same config with one rollout worker, pipelined
    assert one.cfg.rollout.num_workers == 1 and one.cfg.grpo.schedule == "pipelined"
    assert one.rl.grad_accum >= 2  # so the pipelined learner had cells to start before the last chunk was scored
    two, s2 = _run(tmp_path / "two", drm_dir, "rollout.num_workers=2", "grpo.schedule=serial")
    for key in ("adv/mean", "adv/std", "adv/abs_max", "reward/final_mean", "reward/step0_mean", "train/loss",
                "train/policy_loss", "train/grad_norm", "train/states"):
        assert s1[key] == s2[key], key
    # on-policy first update: rho = 1, and the rollout's log-probs are the learner's (the workers held its LoRA)
    assert s1["train/ratio_max_dev"] == 0.0 and s1["train/rollout_logp_dev"] < 1e-4
    assert s2["train/rollout_logp_dev"] < 1e-4
    # after the sync every rollout worker holds the learner's adapter
    assert len(two.worker_checksums) == 2
    assert set(two.worker_checksums) == {two.final_lora_checksum}
    assert one.final_lora_checksum == two.final_lora_checksum  # bit for bit
    # per-role accounting: busy time within the role's capacity; the critical path is a chain within the iteration
    for s in (s1, s2):
        for role in ("rollout", "score", "learn"):
            assert s[f"busy/{role}_s"] > 0 and 0 < s[f"util/{role}"] <= 1.0 + 1e-6, role
        chain = sum(v for k, v in s.items() if k.startswith("critical/"))
        assert all(v >= 0 for k, v in s.items() if k.startswith("critical/"))
        assert 0.5 * s["timing/iteration"] < chain <= s["timing/iteration"] + 1e-6
    # serial: the phases follow each other; the scoring of the last chunk waited for every rollout
    assert s2["critical/score_wait_s"] >= 0 and s2["timing/score"] <= s2["timing/iteration"]
    ckpt = tmp_path / "two" / "checkpoints" / "iter-000001"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["iteration"] == 1 and state["version"] == 1 and state["sampler"]["drawn"] == 4
    assert state["mlflow_run_id"] and (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((ckpt / "learner").rglob("*optim_states.pt"))  # DeepSpeed optimizer state of the learner
    assert not list((tmp_path / "two" / "checkpoints").glob(".*"))  # nothing half-written left

    # the saved LoRA loads into a stock diffusers pipeline and changes its output
    def sample(pipe):
        return pipe("a red circle", height=64, width=64, num_inference_steps=3, output_type="latent",
                    generator=torch.Generator().manual_seed(0), max_sequence_length=32).images

    pipe = build_tiny(seed=0).pipeline()
    base = sample(pipe)
    pipe.load_lora_weights(tmp_path / "two" / "lora")
    assert not torch.equal(base, sample(pipe))


def test_two_learner_workers_two_rewards_and_judges_on_held_out_prompts(ray_session, tmp_path, drm_dir,
                                                                         tiny_clip_dir):
    # rank 1 must not wait for work before rank 0 has opened the generation's queues (this hung before).
    # The same run optimizes the DRM and a plug-in image reward (on each child's x0_hat) and evaluates held-out
    # prompts with a CLIP judge, so one driver start-up covers them all.
    import shutil

    held_out = tmp_path / "eval_prompts.txt"
    held_out.write_text("a yellow star\na purple moon\n")
    second = shutil.copytree(tiny_clip_dir, tmp_path / "clip_b")  # a second judge of the same kind, named by source
    driver, summary = _run(tmp_path / "two", drm_dir, "learner.num_workers=2", "learner.num_cpus=0.5",
                           "rollout.timeout_s=120", "reward.rewards=[drm, callable=0.5]",
                           "reward.callable=reward_plugins:brightness", f"reward.judges=[clip, clip@{second}]",
                           f"reward.clip_path={tiny_clip_dir}", f"data.eval_prompts={held_out}",
                           "grpo.eval_panel_size=3")
    assert driver.version == 1 and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert summary["train/states"] == 4 * 3  # every state trained once across the two ranks
    # both rewards scored every child (the plug-in on x0_hat: one policy forward per child) and are logged apart
    written = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert written["compute"]["x0_forwards"] == 4 * 3 * 4  # prompts x branching steps x k
    for key in ("reward/drm/final_mean", "reward/callable/final_mean", "reward/callable/step0_mean",
                "eval/drm_score", "eval/callable_score", "eval/reward", "eval/judge/clip", "eval/overopt/clip",
                "eval/judge/clip-clip_b", "eval/overopt/clip-clip_b",
                "reward/step0_final_spearman", "reward/step1_final_spearman"):
        assert key in summary, key
    # the panel is the held-out prompts, cycled; the judge's score is the stock CLIP's on the same images
    assert driver.rl.eval_texts == ["a yellow star", "a purple moon", "a yellow star"]
    assert [e["iteration"] for e in written["eval"]] == [0, 1]
    # the plug-in saw the panel's images as uint8 and their prompt texts: recompute it from the logged panel PNG
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    png = client.download_artifacts(written["mlflow_run_id"], "panel/iter_000001.png", str(tmp_path))
    grid = np.asarray(Image.open(png)).astype(np.float64)  # one row of 64 px tiles
    tiles = [grid[:, 64 * i:64 * (i + 1)].astype(np.uint8) for i in range(3)]
    ref = np.mean([t.mean() + len(p) for t, p in zip(tiles, driver.rl.eval_texts)])
    assert summary["eval/callable_score"] == pytest.approx(ref, abs=1e-3)
    # both judges are the stock CLIPModel's logit of each panel image with its own prompt
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        inputs = processor(text=driver.rl.eval_texts, images=tiles, return_tensors="pt", padding=True)
        stock = float(model(**inputs).logits_per_image.diagonal().mean())
    assert summary["eval/judge/clip"] == pytest.approx(stock, abs=1e-3)
    assert summary["eval/judge/clip-clip_b"] == pytest.approx(stock, abs=1e-3)
    # the work counts reach MLflow as well as summary.json
    assert client.get_metric_history(written["mlflow_run_id"], "compute/x0_forwards")[-1].value == 4 * 3 * 4
