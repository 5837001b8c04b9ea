"""Driver side of DRM training: one Ray Train `TorchTrainer` (DeepSpeed ZeRO-2) over the embedding cache.

The driver starts the trainer, turns the metrics its rank 0 sends into MLflow metrics and a progress line, and at the
end copies the DRM directory out of the latest checkpoint into `<output_dir>/drm`. Resubmitting with the same
output directory resumes from the latest checkpoint of the same Ray Train run (`<output_dir>/ray_train/drm`).
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

from drm_ray.data.cache import read_meta
from drm_ray.models.sd3 import latent_size, model_kwargs
from drm_ray.tracking import Tracker
from drm_ray.reward.train_loop import drm_train_loop

log = logging.getLogger(__name__)


def train_loop_config(cfg, cache_dir: str | Path) -> dict:
    """The plain values the per-worker loop needs (workers never see the Config object)."""
    r = cfg.drm
    return dict(
        preset=cfg.model.preset, model_kwargs=model_kwargs(cfg.model, cfg.sampling), n_drop=r.n_drop,
        head=r.head, head_dim=r.head_dim, init=r.init, 
        latent_size=latent_size(cfg.model.preset, cfg.sampling.resolution),
        seed=cfg.run.seed, lr=r.lr, batch_size=r.batch_size, train_steps=r.train_steps,
        zero_noise_prob=r.zero_noise_prob, shift=cfg.sampling.shift, log_every=r.log_every,
        checkpoint_every=r.checkpoint_every, zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16,
        max_grad_norm=r.max_grad_norm, cache_dir=str(Path(cache_dir).resolve()),
        torch_threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
    )


def train_drm(cfg, cache_dir: str | Path, tracker: Tracker | None = None, max_failures: int = 0) -> Path:
    """Train a DRM on `cache_dir`; returns the DRM directory `<output_dir>/drm`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    meta = read_meta(cache_dir)  # fails early, naming the path, if the cache is incomplete
    out = Path(cfg.run.output_dir).resolve()
    loop_cfg = train_loop_config(cfg, cache_dir)
    latent = loop_cfg["latent_size"]
    if list(meta["latent_shape"][1:]) != [latent, latent]:
        raise ValueError(f"{cache_dir} holds {meta['latent_shape']} latents but sampling.resolution="
                         f"{cfg.sampling.resolution} needs {latent}x{latent}: rebuild the cache for this resolution")
    metrics_queue = Queue(actor_options={"num_cpus": 0})
    loop_cfg["metrics_queue"] = metrics_queue
    trainer = TorchTrainer(
        drm_train_loop, train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if cfg.drm.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.drm.num_workers, use_gpu=cfg.drm.use_gpu,
                                     resources_per_worker={"CPU": cfg.drm.num_cpus,
                                                           **({"GPU": 1} if cfg.drm.use_gpu else {})}),
        run_config=RunConfig(name="drm", storage_path=str(out / "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result_box: dict = {}
    thread = threading.Thread(target=lambda: result_box.update(result=_fit(trainer)), daemon=True)
    start = time.perf_counter()
    thread.start()
    while thread.is_alive() or not metrics_queue.empty():
        try:
            metrics = metrics_queue.get(timeout=1.0)
        except (pyqueue.Empty, ray.util.queue.Empty):
            continue
        step = int(metrics.pop("step"))
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        print(f"[train_drm] step {step}/{cfg.drm.train_steps} loss {metrics['train/loss']:.4f} "
              f"acc {metrics['train/accuracy']:.3f} {metrics['train/pairs_per_s']:.0f} pairs/s "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    thread.join()
    result = result_box["result"]
    if isinstance(result, BaseException):
        raise result
    if result.error:
        raise RuntimeError(f"DRM training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("DRM training finished without a checkpoint")
    dest = out / "drm"
    with result.checkpoint.as_directory() as d:
        tmp = out / ".drm.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(d) / "drm", tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    ray.kill(metrics_queue.actor)
    return dest


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # surfaced on the main thread
        return err
