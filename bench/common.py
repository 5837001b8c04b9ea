"""Helpers shared by the benchmarks in bench/ (not part of the library, not a test).

Process environment (one torch thread, no hub, DeepSpeed on CPU), an untrained DRM for timing runs, the learner's
DeepSpeed engine in ONE plain process (gloo, world size 1, as tests/test_learner.py does), payload sizes, a plain
text table, and optional MLflow logging of a benchmark's table and numbers through `drm_ray.tracking.Tracker`.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
       # a private extension cache: concurrent DeepSpeed JIT builds into one cache were seen to collide
       "TORCH_EXTENSIONS_DIR": os.path.join(tempfile.gettempdir(), "drm_ray_bench_torch_ext")}


def setup_env() -> None:
    """Environment defaults for a benchmark process (explicit settings win); call before importing torch."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def untrained_drm(cfg, directory: Path) -> Path:
    """An untrained DRM for `cfg`'s architecture (timings only: its scores mean nothing); reused if present."""
    from drm_ray.reward.model import build_drm
    from drm_ray.models.sd3 import build_components, latent_size, model_kwargs

    if (directory / "drm_config.json").is_file():
        return directory
    comps = build_components(cfg.model.preset, **model_kwargs(cfg.model, cfg.sampling), text=False, vae=False,
                             device="cpu")
    r = cfg.drm
    drm = build_drm(comps.transformer, n_drop=r.n_drop, head=r.head, head_dim=r.head_dim, init=r.init,
                    latent_size=latent_size(cfg.model.preset, cfg.sampling.resolution), seed=cfg.run.seed)
    return drm.save_pretrained(directory)


def single_process_group(backend: str = "gloo") -> None:
    """torch.distributed with world size 1 in this process, with the env DeepSpeed reads (torchrun's variables)."""
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ[key] = value
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def learner_train_cfg(cfg, num_states: int, world: int = 1) -> dict:
    """The learner loop's config dict for `train_update` (drm_ray.rl_setup.update_config, as the job builds it)."""
    from drm_ray.rl_setup import update_config

    return update_config(cfg, num_states, world)


def learner_engine(cfg, train_cfg: dict, device=None):
    """(engine, transformer, sigmas): what `learner_loop` builds on one rank, in this process."""
    from drm_ray.diffusion.flow import schedule_sigmas
    from drm_ray.models.lora import add_lora
    from drm_ray.models.sd3 import build_components, model_kwargs
    from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine

    comps = build_components(cfg.model.preset, text=False, vae=False, device=device,
                             **model_kwargs(cfg.model, cfg.sampling))
    transformer = comps.transformer
    params = add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.target_modules))
    ds = deepspeed_config(cfg.learner.micro_batch_states, train_cfg["grad_accum"], 1, cfg.deepspeed.zero_stage,
                          cfg.deepspeed.bf16, cfg.learner.max_grad_norm)
    engine, _ = init_engine(transformer, params, cfg.learner.lr, cfg.learner.weight_decay, ds)
    return engine, transformer, schedule_sigmas(comps.scheduler, cfg.sampling.num_steps)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not `getrusage(...).ru_maxrss`: Linux carries the pre-exec
    high-water mark over `execve`, so a child of a large parent would report at least the parent's RSS at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def pickle_cost(obj, repeats: int = 3) -> tuple[float, float]:
    """(MB, seconds for dumps + loads, best of `repeats`) with pickle protocol 5: what a copy through Ray costs
    at least (Ray also writes the bytes into the object store and reads them back)."""
    best, size = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        blob = pickle.dumps(obj, protocol=5)
        pickle.loads(blob)
        best = min(best, time.perf_counter() - start)
        size = len(blob)
    return size / 2**20, best


def format_table(header: list[str], rows: list[list], title: str = "") -> str:
    """A plain fixed-width table; floats with 3 decimals unless already formatted."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: " | ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    out = ([title] if title else []) + [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(out)


def emit_markdown(lines: list[str], out: str | Path | None = None) -> str:
    """Print a benchmark's markdown report (lines joined) and, when `out` is given, also write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return text


def log_to_mlflow(name: str, out_dir: Path, params: dict, metrics: dict, text: str,
                  tracking_uri: str | None = None) -> str:
    """One MLflow run (experiment `drm-ray-bench`) with the benchmark's params, numbers and table; returns its id."""
    from drm_ray.tracking import Tracker

    tracker = Tracker(tracking_uri, "drm-ray-bench", out_dir, run_name=name, tags={"bench": name})
    tracker.log_params(params)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    tracker.log_text(text, f"{name}.txt")
    tracker.end()
    print(f"[bench] logged to MLflow run {tracker.run_id} ({tracker.uri})", flush=True)
    return tracker.run_id
