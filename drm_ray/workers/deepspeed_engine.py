"""DeepSpeed engine set-up shared by the DRM trainer and the Step-GRPO learner (ZeRO-0/1/2; fp32 on CPU, bf16 on GPU).

On CPU DeepSpeed uses its CPU accelerator over gloo (`DS_ACCELERATOR=cpu`). Two things it would otherwise compile on
the first run are avoided: the shared-memory inference all-reduce op (unused by training) and the fused CPU Adam
(a torch AdamW instance is passed in instead).
"""

from __future__ import annotations

import os

import torch


def deepspeed_config(micro_batch: int, grad_accum: int, world_size: int, zero_stage: int, bf16: bool,
                     max_grad_norm: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": max_grad_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_engine(model: torch.nn.Module, params, lr: float, weight_decay: float, config: dict):
    """deepspeed.initialize over `params` (the trainable subset) with a torch AdamW."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 60 s JIT build we do not use
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                                   config=config, dist_init_required=False)
    return engine, optimizer


def train_worker_setup(config: dict):
    """Inside a Ray Train worker: (rank, world size, device, SD3 components without text encoders or VAE)."""
    import ray.train
    import ray.train.torch

    from drm_ray.models.sd3 import build_components

    ctx = ray.train.get_context()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    comps = build_components(config["preset"], text=False, vae=False, device=device, **config["model_kwargs"])
    return ctx.get_world_rank(), ctx.get_world_size(), device, comps
