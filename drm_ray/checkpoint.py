"""Step-GRPO checkpoints: save and find the newest complete one.

    <output_dir>/checkpoints/iter-000010/
        state.json        iteration, policy version, prompt-sampler state, driver RNG state, MLflow run id
        lora/             the adapter in diffusers format (StableDiffusion3Pipeline.load_lora_weights)
        lora_state.safetensors   the adapter as the learner publishes it (exact, for resuming)
        learner/          DeepSpeed checkpoint of every learner rank (LoRA + optimizer state)

A checkpoint is assembled under a temporary name (`.iter-000010.tmp`) and renamed when complete, so a kill while
saving never leaves a directory that `latest_checkpoint` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drm_ray.models.lora import save_lora_diffusers

PREFIX = "iter-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / "checkpoints"


def staging_dir(output_dir: str | Path, iteration: int) -> Path:
    """Where the learner and the driver write a checkpoint before it is committed."""
    path = checkpoint_root(output_dir) / f".{PREFIX}{iteration:06d}.tmp"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def commit_checkpoint(output_dir: str | Path, iteration: int, staging: Path, state: dict,
                      lora: dict[str, torch.Tensor], lora_cfg: dict, keep: int = 3) -> Path:
    save_file({k: v.contiguous() for k, v in lora.items()}, staging / "lora_state.safetensors")
    save_lora_diffusers(lora, staging / "lora", lora_cfg["rank"], lora_cfg["alpha"],
                        tuple(lora_cfg["target_modules"]))
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    final = checkpoint_root(output_dir) / f"{PREFIX}{iteration:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in sorted(checkpoint_root(output_dir).glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never match)."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "state.json").read_text()), load_file(path / "lora_state.safetensors")
