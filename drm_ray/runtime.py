"""Process set-up shared by the jobs: environment defaults and joining (or starting) Ray."""

from __future__ import annotations

import os

# Defaults a job process and every Ray worker it starts should share (an explicit setting wins).
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",      # one torch thread per process: 2 threads on 2 shared cores ran 10x slower
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",     # only used where no GPU exists; a GPU process overrides it
}


CPU_PRESETS = ("tiny", "toy")  # built in code or loaded from a local checkpoint; never a model hub


def job_env(preset: str, model_path: str | None = None) -> None:
    """Environment defaults for a job process, then (pre-trained presets) a check that model.path can provide the
    weights, so a missing or gated model fails here with one clear line. Only the CPU presets force offline mode;
    sd35m fetches from a local directory or the hub (HF_TOKEN for gated weights)."""
    for key, value in WORKER_ENV.items():
        if key == "DS_ACCELERATOR" and preset not in CPU_PRESETS:
            continue
        os.environ.setdefault(key, value)
    if preset in CPU_PRESETS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if preset not in CPU_PRESETS:
        from drm_ray.models.sd3 import ModelSourceError, check_model_source

        try:
            check_model_source(model_path)
        except ModelSourceError as err:
            from drm_ray.console import fail

            fail(err)  # one line, not a traceback: the user's input is wrong


def init_ray(num_cpus: int | None = None) -> str:
    """Join the cluster of `ray job submit` (RAY_ADDRESS set), or start a local Ray, unless Ray is already up;
    returns what it did.

    A local Ray uses `address="local"` (a plain `ray.init()` would attach to any `ray start` cluster found on the
    machine), gets no dashboard (it would bind a port) and passes the job's thread and offline settings to its
    workers.
    """
    import logging

    import ray

    from drm_ray.console import verbose

    if ray.is_initialized():
        return "connected to the running Ray"
    # without --verbose, worker output (Ray Train's controller and cleaner actors, library warnings in every
    # actor) stays in Ray's session logs instead of the job's console; errors still reach the driver as exceptions
    quiet = dict(log_to_driver=verbose(), logging_level=logging.INFO if verbose() else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", **quiet)
        return f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}"
    keys = (*WORKER_ENV, "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "TRANSFORMERS_VERBOSITY",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": env}, **quiet)
    return "started a local Ray"
