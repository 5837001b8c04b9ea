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


def _learnable_cache(path, n=256, seed=0, sign=1.0):
    """Winners have +1 in latent channel 0 (sign=-1: -1, a held-out set on which learning the rule hurts)."""
    g = torch.Generator().manual_seed(seed)
    win, lose = torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g)
    win[:, 0] += sign
    batch = PairBatch(win, lose, torch.randn(n, 109, 64, generator=g), torch.randn(n, 64, generator=g),
                      torch.ones(n), [f"p{i}" for i in range(n)])
    for i in range(4):
        part = torch.arange(i * n // 4, (i + 1) * n // 4)
        write_shard(path, i, pair_rows(PairBatch(batch.latent_win[part], batch.latent_lose[part],
                                                 batch.prompt_embeds[part], batch.pooled[part], batch.label[part],
                                                 [batch.prompt[j] for j in part.tolist()])))
    write_meta(path, [16, 8, 8], [109, 64], [64])
    return path


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _val_mean(drm_dir, heldout, cfg):
    from drm_ray.reward.train_loop import load_validation_pairs, validate

    drm = DiffusionRewardModel.from_pretrained(drm_dir)
    pairs, index = load_validation_pairs(heldout, cfg.drm.val_pairs)
    return validate(drm, pairs, index, cfg.drm.val_timesteps, cfg.run.seed, world=1, batch_size=16)


def test_training_lowers_the_loss_keeps_the_best_and_resumes(ray_session, tmp_path):
    """2 ranks x 2 accumulated micro-steps of 4 pairs with checkpointing; validation on a held-out set whose rule
    is the reverse of the training set's, so the best validation comes early and differs from the last DRM."""
    from drm_ray.models.sd3 import latent_size, model_kwargs
    from drm_ray.reward.train_loop import build_training_drm
    from drm_ray.reward.trainer import train_drm

    cache = _learnable_cache(tmp_path / "cache")
    heldout = _learnable_cache(tmp_path / "heldout", n=64, seed=1, sign=-1.0)
    out = tmp_path / "run"
    overrides = [f"run.output_dir={out}", "drm.num_workers=2", "drm.lr=1e-3", "drm.log_every=10",
                 "drm.checkpoint_every=20", "drm.zero_noise_prob=0.5", "drm.batch_size=16", "drm.micro_batch=4",
                 "drm.gradient_checkpointing=true", "drm.val_every=10", "drm.val_pairs=48",
                 f"data.heldout_data={heldout}"]
    cfg = load_config("tiny", overrides + ["drm.train_steps=60"])
    assert cfg.drm_accumulation() == (4, 2)
    tracker = Tracker(None, "t", out)
    drm_dir = train_drm(cfg, cache, tracker)
    client = MlflowClient(tracker.uri)
    losses = [v for _, v in sorted(_history(client, tracker.run_id, "train/loss").items())]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses

    # every parameter the loss reaches moved away from its initial value (same seed, same build as the workers)
    r = cfg.drm
    model = build_training_drm("tiny", model_kwargs(cfg.model, cfg.sampling), "cpu", n_drop=r.n_drop, head=r.head,
                               head_dim=r.head_dim, init=r.init, seed=cfg.run.seed,
                               latent_size=latent_size("tiny", cfg.sampling.resolution))
    x = torch.randn(2, 16, 8, 8)
    model(x, torch.rand(2), torch.randn(2, 109, 64), torch.randn(2, 64)).sum().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    initial = model.state_dict()
    last = DiffusionRewardModel.from_pretrained(out / "drm_last").state_dict()
    assert sorted(last) == sorted(initial) and len(reached) > 20 and "head.out.weight" in reached
    assert [k for k in reached if torch.equal(last[k], initial[k])] == []

    # validation: logged at 10, 20, ..., 60 for every t; drm/ is the DRM of the best logged step, drm_last/ the last
    val = _history(client, tracker.run_id, "val/accuracy_mean")
    assert sorted(val) == [10, 20, 30, 40, 50, 60]
    for t in r.val_timesteps:
        assert sorted(_history(client, tracker.run_id, f"val/accuracy_t{t}")) == sorted(val)
    best_step = min(s for s in val if val[s] == max(val.values()))
    assert _history(client, tracker.run_id, "val/best_step")[60] == best_step and best_step < 60, val
    assert _val_mean(drm_dir, heldout, cfg)["val/accuracy_mean"] == pytest.approx(val[best_step], abs=1e-9)
    assert _val_mean(out / "drm_last", heldout, cfg)["val/accuracy_mean"] == pytest.approx(val[60], abs=1e-9)
    best_weights = DiffusionRewardModel.from_pretrained(drm_dir).state_dict()

    # a resubmission with more steps continues from step 60 of the same Ray Train run, and keeps the best so far
    resumed = Tracker(None, "t", out)
    train_drm(load_config("tiny", overrides + ["drm.train_steps=80"]), cache, resumed)
    assert sorted(_history(client, resumed.run_id, "train/loss")) == [70, 80]
    val_all = {**val, **_history(client, resumed.run_id, "val/accuracy_mean")}
    assert sorted(val_all) == [10, 20, 30, 40, 50, 60, 70, 80]
    best_all = min(s for s in val_all if val_all[s] == max(val_all.values()))
    assert _history(client, resumed.run_id, "val/best_step")[80] == best_all
    assert _val_mean(drm_dir, heldout, cfg)["val/accuracy_mean"] == pytest.approx(val_all[best_all], abs=1e-9)
    if best_all == best_step:  # the best of the first run survived the restart (restored from the checkpoint)
        after = DiffusionRewardModel.from_pretrained(drm_dir).state_dict()
        assert all(torch.equal(after[k], best_weights[k]) for k in after)


def test_asking_for_gpus_without_them_fails_at_once(ray_session, tmp_path):
    from drm_ray.placement import ClusterResourcesError
    from drm_ray.reward.trainer import train_drm

    cache = _learnable_cache(tmp_path / "cache", n=16)
    cfg = load_config("tiny", [f"run.output_dir={tmp_path / 'run'}", "drm.use_gpu=true", "drm.num_workers=2"])
    with pytest.raises(ClusterResourcesError, match="DRM trainer workers"):
        train_drm(cfg, cache)


def test_train_and_eval_jobs_run_end_to_end(ray_session, tmp_path):
    """The two jobs as `ray job submit` runs them (RAY_ADDRESS: they join the session's Ray), training only the last
    kept block and the head (drm.train_blocks=1 of 2 kept blocks)."""
    from drm_ray.models.sd3 import latent_size, model_kwargs
    from drm_ray.reward.train_loop import build_training_drm

    out = tmp_path / "job"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    overrides = [f"run.output_dir={out}", "drm.train_blocks=1", "model.num_layers=5"]
    train = subprocess.run([sys.executable, "jobs/train_drm.py", "--synthetic-pairs", "64", *overrides,
                            "drm.train_steps=20", "drm.log_every=10", "drm.val_every=10", "drm.val_pairs=32",
                            "drm.val_timesteps=[0,500]"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert train.returncode == 0, train.stderr[-4000:]
    assert "step 20/20" in train.stdout and "held-out accuracy at t=0" in train.stdout
    assert (out / "drm" / "model.safetensors").is_file() and (out / "drm_last" / "model.safetensors").is_file()
    assert "step 20/20 val accuracy" in train.stdout  # validated on the synthetic held-out set

    # after real DeepSpeed steps the last block and the head moved; every other weight (embedders, the first block)
    # is bit-identical to a fresh build of the same initial DRM
    cfg = load_config("tiny", overrides)
    r = cfg.drm
    initial = build_training_drm("tiny", model_kwargs(cfg.model, cfg.sampling), "cpu", n_drop=r.n_drop, head=r.head,
                                 head_dim=r.head_dim, init=r.init, seed=cfg.run.seed,
                                 latent_size=latent_size("tiny", cfg.sampling.resolution)).state_dict()
    trained = DiffusionRewardModel.from_pretrained(out / "drm_last").state_dict()
    last = f"blocks.{cfg.model.num_layers - r.n_drop - 1}."
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert moved and all(k.startswith((last, "head.")) for k in moved), sorted(moved)
    assert any(k.startswith("head.") for k in moved) and any(k.startswith(last) for k in moved)

    evaluate = subprocess.run([sys.executable, "jobs/eval_drm.py", "--eval-pairs", "64", f"run.output_dir={out}",
                               "--timesteps", "0", "500", "950"],
                              cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    table = evaluate.stdout
    assert "tie-aware" in table and all(f"\n {t:>3}" in table or f"\n{t:>4}" in table for t in (0, 500, 950))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("drm-ray").experiment_id])
    assert {r.data.tags.get("job") for r in runs} == {"train_drm", "eval_drm"}


def test_deepspeed_accumulation_gives_the_full_batch_gradient(process_group):
    """The real engine (ZeRO-2, one gloo rank in this process): 4 accumulated, checkpointed micro-steps of 2 pairs
    reach the same loss and gradient norm as one step of 8 pairs (a wrong micro-step weight would scale the norm)."""
    from drm_ray.models.sd3 import build_tiny
    from drm_ray.reward.model import build_drm
    from drm_ray.reward.train_loop import draw_pair_noise, train_step
    from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine

    g = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(8, 16, 8, 8, generator=g), torch.randn(8, 16, 8, 8, generator=g),
                      torch.randn(8, 109, 64, generator=g), torch.randn(8, 64, generator=g), torch.ones(8),
                      ["p"] * 8)
    s, eps = draw_pair_noise(8, (16, 8, 8), g, zero_prob=0.25, shift=3.0)
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, n_drop=2, latent_size=8, seed=1)
        drm.requires_grad_(True).train()
        drm.gradient_checkpointing = accum > 1
        engine, _ = init_engine(drm, drm.parameters(), 1e-3, 0.0, deepspeed_config(micro, accum, 1, 2, False, 1e9))
        loss, _, _ = train_step(engine, batch, s, eps, micro, accum, world=1, pairs_per_step=8, device="cpu")
        results.append((loss, float(engine.get_global_grad_norm())))
    (loss_whole, norm_whole), (loss_split, norm_split) = results
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    assert norm_split == pytest.approx(norm_whole, rel=1e-5) and norm_whole > 0
