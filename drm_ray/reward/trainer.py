"""Driver side of DRM training: one Ray Train `TorchTrainer` (DeepSpeed ZeRO-2) over the embedding cache.

The driver checks that the cluster can hold the `drm.*` workers, starts the trainer, turns the metrics its rank 0
sends into MLflow metrics and a progress line, and at the end copies the DRM directories out of the latest
checkpoint: `<output_dir>/drm_last` is the final DRM, `<output_dir>/drm` the best by held-out accuracy when
validation is on (`drm.val_every` > 0) and the final one otherwise. Resubmitting with the same output directory
resumes from the latest checkpoint of the same Ray Train run (`<output_dir>/ray_train/drm`).
"""

from __future__ import annotations

import logging
import os
import queue as pyqueue
import shutil
import threading
import time
from pathlib import Path

import ray
from ray.util.queue import Queue

from drm_ray.console import Progress
from drm_ray.data.cache import read_meta
from drm_ray.models.sd3 import latent_size, model_kwargs
from drm_ray.placement import RoleDemand, ensure_resources, parse_resources
from drm_ray.tracking import Tracker
from drm_ray.reward.train_loop import drm_train_loop

log = logging.getLogger(__name__)


def train_loop_config(cfg, cache_dir: str | Path, heldout_dir: str | Path | None = None) -> dict:
    """The plain values the per-worker loop needs (workers never see the Config object)."""
    r = cfg.drm
    micro, accum = cfg.drm_accumulation()
    return dict(
        preset=cfg.model.preset, model_kwargs=model_kwargs(cfg.model, cfg.sampling), n_drop=r.n_drop,
        train_blocks=r.train_blocks, head=r.head, head_dim=r.head_dim, init=r.init,
        latent_size=latent_size(cfg.model.preset, cfg.sampling.resolution),
        seed=cfg.run.seed, lr=r.lr, batch_size=r.batch_size, micro=micro, accum=accum,
        gradient_checkpointing=r.gradient_checkpointing, train_steps=r.train_steps,
        zero_noise_prob=r.zero_noise_prob, pair_noise=r.pair_noise, shift=cfg.sampling.shift, log_every=r.log_every,
        checkpoint_every=r.checkpoint_every, val_every=r.val_every, val_pairs=r.val_pairs,
        val_timesteps=list(r.val_timesteps), heldout_dir=str(Path(heldout_dir).resolve()) if heldout_dir else None,
        zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16, max_grad_norm=r.max_grad_norm,
        cache_dir=str(Path(cache_dir).resolve()), torch_threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
    )


def worker_resources(drm_cfg) -> dict[str, float]:
    """Ray Train `resources_per_worker` of one DRM trainer worker (`drm_cfg`: the DRMConfig)."""
    return {"CPU": drm_cfg.num_cpus, **({"GPU": 1.0} if drm_cfg.use_gpu else {}),
            **parse_resources(drm_cfg.resources)}


def train_drm(cfg, cache_dir: str | Path, tracker: Tracker | None = None, max_failures: int = 0,
              heldout_dir: str | Path | None = None) -> Path:
    """Train a DRM on `cache_dir`, validating on `heldout_dir` (default `data.heldout_data`, a cache) every
    `drm.val_every` steps; returns `<output_dir>/drm` (see the module docstring)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.drm
    heldout_dir = heldout_dir or cfg.data.heldout_data
    meta = read_meta(cache_dir)  # fails early, naming the path, if the cache is incomplete
    if r.val_every and heldout_dir is None:
        raise ValueError(f"drm.val_every = {r.val_every} needs a held-out cache: set data.heldout_data")
    out = Path(cfg.run.output_dir).resolve()
    loop_cfg = train_loop_config(cfg, cache_dir, heldout_dir if r.val_every else None)
    latent = loop_cfg["latent_size"]
    for path, m in [(cache_dir, meta)] + ([(heldout_dir, read_meta(heldout_dir))] if r.val_every else []):
        if list(m["latent_shape"][1:]) != [latent, latent]:
            raise ValueError(f"{path} holds {m['latent_shape']} latents but sampling.resolution="
                             f"{cfg.sampling.resolution} needs {latent}x{latent}: rebuild the cache for this "
                             "resolution")
    resources = worker_resources(r)
    ensure_resources([RoleDemand("DRM trainer workers", r.num_workers, {k: v for k, v in resources.items() if v})],
                     cfg.rollout.autoscale_wait_s)
    metrics_queue = Queue(actor_options={"num_cpus": 0})
    loop_cfg["metrics_queue"] = metrics_queue
    trainer = TorchTrainer(
        drm_train_loop, train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="drm", storage_path=str(out / "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result_box: dict = {}
    thread = threading.Thread(target=lambda: result_box.update(result=_fit(trainer)), daemon=True)
    start = time.perf_counter()
    progress = Progress(r.train_steps, 0, "train_drm", unit="step", lines=10)
    thread.start()
    while thread.is_alive() or not metrics_queue.empty():
        try:
            metrics = metrics_queue.get(timeout=1.0)
        except (pyqueue.Empty, ray.util.queue.Empty):
            continue
        step = int(metrics.pop("step"))
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        if "train/loss" in metrics:
            progress.update(step, f"loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.3f} "
                                  f"{metrics['train/pairs_per_s']:.0f} pairs/s")
        else:  # validation: always its own line
            progress.write(f"[train_drm] {_validation_line(metrics, step, r.train_steps)} "
                           f"({time.perf_counter() - start:.0f}s)")
    progress.close()
    thread.join()
    ray.kill(metrics_queue.actor)
    return _export(result_box["result"], out)


def _export(result, out: Path) -> Path:
    """Copy the DRM directories out of the final checkpoint: drm_last/ and drm/ (best, or the final one)."""
    if isinstance(result, BaseException):
        raise result
    if result.error:
        raise RuntimeError(f"DRM training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("DRM training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        best = Path(d) / "drm_best"
        _replace_dir(Path(d) / "drm", out / "drm_last")
        if best.is_dir():
            _replace_dir(best, out / "drm")
        else:  # no validation: the final DRM, hard-linked (no second copy of the weights)
            _replace_dir(out / "drm_last", out / "drm", link=True)
    return out / "drm"


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # surfaced on the main thread
        return err


def _validation_line(metrics: dict, step: int, total: int) -> str:
    per_t = " ".join(f"t{k.split('_t')[-1]} {v:.3f}" for k, v in metrics.items() if k.startswith("val/accuracy_t"))
    return (f"step {step}/{total} val accuracy {metrics['val/accuracy_mean']:.3f} ({per_t}), "
            f"best at step {int(metrics['val/best_step'])}")


def _replace_dir(src: Path, dest: Path, link: bool = False) -> None:
    """Copy (or hard-link) directory `src` to `dest`, replacing it atomically."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy if link else shutil.copy2)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the files are never modified in place: both directories are always rewritten whole
    except OSError:
        shutil.copy2(src, dst)
