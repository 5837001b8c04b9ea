"""DRM training through Ray Train + DeepSpeed (ZeRO-2, gloo, 2 ranks), resume, and the train/eval jobs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from drm_ray.config import load_config
from drm_ray.data.cache import PairBatch, pair_rows, write_meta, write_shard
from drm_ray.reward.model import DiffusionRewardModel
from drm_ray.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _learnable_cache(path, n=256):
    """Winners have +1 in latent channel 0: a rule a DRM learns in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    win, lose = torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g)
    win[:, 0] += 1.0
    batch = PairBatch(win, lose, torch.randn(n, 109, 64, generator=g), torch.randn(n, 64, generator=g),
                      torch.ones(n), [f"p{i}" for i in range(n)])
    for i in range(4):
        part = torch.arange(i * n // 4, (i + 1) * n // 4)
        write_shard(path, i, pair_rows(PairBatch(batch.latent_win[part], batch.latent_lose[part],
                                                 batch.prompt_embeds[part], batch.pooled[part], batch.label[part],
                                                 [batch.prompt[j] for j in part.tolist()])))
    write_meta(path, [16, 8, 8], [109, 64], [64])
    return path


def test_training_lowers_the_loss_and_resumes(ray_session, tmp_path):
    from drm_ray.reward.trainer import train_drm

    cache = _learnable_cache(tmp_path / "cache")
    out = tmp_path / "run"
    overrides = [f"run.output_dir={out}", "drm.num_workers=2", "drm.lr=1e-3", "drm.log_every=10",
                 "drm.checkpoint_every=20", "drm.zero_noise_prob=0.5"]
    tracker = Tracker(None, "t", out)
    drm_dir = train_drm(load_config("tiny", overrides + ["drm.train_steps=60"]), cache, tracker)
    client = MlflowClient(tracker.uri)
    losses = [m.value for m in sorted(client.get_metric_history(tracker.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    first = DiffusionRewardModel.from_pretrained(drm_dir)
    assert (first.state_dict()["head.out.weight"] != 0).any()

    # a resubmission with more steps continues from step 60 of the same Ray Train run
    resumed = Tracker(None, "t", out)
    train_drm(load_config("tiny", overrides + ["drm.train_steps=80"]), cache, resumed)
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")]
    assert sorted(steps) == [70, 80]


def test_train_and_eval_jobs_run_end_to_end(tmp_path):
    out = tmp_path / "job"
    env = {**os.environ}
    train = subprocess.run([sys.executable, "jobs/train_drm.py", "--synthetic-pairs", "64", f"run.output_dir={out}",
                            "drm.train_steps=20", "drm.log_every=10"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert train.returncode == 0, train.stderr[-4000:]
    assert "step 20/20" in train.stdout and "held-out accuracy at t=0" in train.stdout
    assert (out / "drm" / "model.safetensors").is_file()
    evaluate = subprocess.run([sys.executable, "jobs/eval_drm.py", "--eval-pairs", "64", f"run.output_dir={out}",
                               "--timesteps", "0", "500", "950"],
                              cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    table = evaluate.stdout
    assert "tie-aware" in table and all(f"\n {t:>3}" in table or f"\n{t:>4}" in table for t in (0, 500, 950))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("drm-ray").experiment_id])
    assert {r.data.tags.get("job") for r in runs} == {"train_drm", "eval_drm"}
