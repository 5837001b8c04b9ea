"""LoRA on the SD3 transformer (peft through diffusers' adapter integration), and moving adapter states around.

The adapter is the only trainable part of the policy; the reference policy is the same network with the adapter
disabled. A LoRA state is the `get_peft_model_state_dict` dict (CPU tensors); `load_lora_state` checks keys, shapes
and dtype before loading, so a state from another architecture or rank fails with a message instead of loading
half.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

ADAPTER = "default"


def add_lora(transformer, rank: int, alpha: float, target_modules: tuple[str, ...], seed: int = 0):
    """Add a LoRA adapter (B = 0, so the policy starts equal to the reference); freezes every base weight."""
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                           init_lora_weights=True), adapter_name=ADAPTER)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameters were created: none of {target_modules} matched a module")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights as detached CPU tensors (cast to `dtype` if given)."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", dtype=dtype or v.dtype).clone() for k, v in state.items()}


def check_lora_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first mismatching keys/shapes/dtypes between two LoRA states."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA state keys do not match the policy's adapter: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    bad = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"LoRA state shapes do not match the policy's adapter (rank or width differs): {bad[:3]}")
    bad = [f"{k}: {state[k].dtype}" for k in expected if not state[k].is_floating_point()]
    if bad:
        raise ValueError(f"LoRA state tensors must be floating point: {bad[:3]}")
    bad = [k for k in expected if not torch.isfinite(state[k]).all()]
    if bad:
        raise ValueError(f"LoRA state holds NaN or inf values: {bad[:3]}")


def load_lora_state(transformer, state: dict[str, torch.Tensor]) -> None:
    """Validate, then load `state` into the transformer's adapter (cast to its dtype and device)."""
    current = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    check_lora_state(current, state)
    cast = {k: v.to(device=current[k].device, dtype=current[k].dtype) for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, cast, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA state has keys the model did not take: {result.unexpected_keys[:3]}")


def lora_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys and float32 bytes: equal adapters give equal checksums across processes."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def lora_norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.float() ** 2).sum() for v in state.values())))


@contextmanager
def adapter_disabled(transformer):
    """The reference policy: the same network with the LoRA adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_lora_diffusers(state: dict[str, torch.Tensor], directory: str | Path, rank: int, alpha: float,
                        target_modules: tuple[str, ...]) -> Path:
    """Write the adapter in diffusers format: `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it.

    The LoRA config travels as adapter metadata: without it diffusers assumes alpha = rank and the loaded adapter
    would be scaled differently from the trained one.
    """
    from diffusers import StableDiffusion3Pipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=metadata)
    return directory
