"""What every model builder shares: the SD3 component bundle, dtype names, the torch device and seeded construction.

`models/sd3.py` (tiny | toy | sd35m builders) and `toy/model.py` both build on this module, so neither imports the
other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SD3Components:
    transformer: SD3Transformer2DModel
    vae: Any                              # AutoencoderKL, or the toy preset's PatchPCACodec
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    scheduler: FlowMatchEulerDiscreteScheduler

    def pipeline(self) -> StableDiffusion3Pipeline:
        """A stock diffusers pipeline over these modules (shares the weights, copies nothing)."""
        vae = self.vae if isinstance(self.vae, AutoencoderKL) else None  # the toy codec is not a diffusers VAE
        return StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=self.scheduler, vae=vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )


def empty_parts() -> dict:
    """The optional members of SD3Components, all absent."""
    return dict(vae=None, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                tokenizer=None, tokenizer_2=None, tokenizer_3=None)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def default_device() -> torch.device:
    """The torch device, chosen from torch (never from Ray's GPU ids, which may be fake)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """`build()` under `torch.manual_seed(seed)`, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
