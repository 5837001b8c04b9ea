"""The toy preset's "VAE": a fixed linear patch codec fitted by PCA, in place of a trained AutoencoderKL.

Each 4x4 RGB patch (48 numbers) maps to 16 latent channels: the top 16 principal components of the toy dataset's
patches, whitened (unit variance per channel, which flow matching wants). 32x32 images become [16, 8, 8] latents,
the SD3 latent layout at a quarter of the resolution; decoding is the transpose map, so encode(decode(z)) = z.

Why not a trained VAE: on 2 CPU cores the whole pre-training budget (~10 minutes) should go to the transformer; a
VAE trained in a fraction of that would blur the images, and the oracle grades pixels, so reconstruction error would
be confounded with the generator's error. The PCA codec costs seconds, keeps > 99% of the patch variance of the
dataset, and its error is measured and printed by the pre-training job.

It exposes the slice of AutoencoderKL's interface drm-ray uses (`config.scaling_factor`, `config.shift_factor`,
`config.latent_channels`, `encode(x).latent_dist.mode()`, `decode(z, return_dict=False)`, `.dtype`, `.device`) and
saves / loads with diffusers' `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class _Posterior:
    latents: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator=None) -> torch.Tensor:
        return self.latents


@dataclass
class _EncoderOutput:
    latent_dist: _Posterior


class PatchPCACodec(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, patch_size: int = 4, latent_channels: int = 16, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        super().__init__()
        dim = 3 * patch_size * patch_size
        self.register_buffer("mean", torch.zeros(dim))                      # [48]
        self.register_buffer("basis", torch.eye(dim)[:, :latent_channels])  # [48, 16], orthonormal columns
        self.register_buffer("scale", torch.ones(latent_channels))          # [16] sqrt of the eigenvalues

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, 16, H/4, W/4] (whitened PCA coefficients)."""
        p = self.config.patch_size
        patches = torch.nn.functional.pixel_unshuffle(x.float(), p)              # [B, 48, h, w]
        z = torch.einsum("bdhw,dc->bchw", patches - self.mean[None, :, None, None], self.basis)
        z = z / self.scale[None, :, None, None]
        out = _EncoderOutput(_Posterior(z.to(x.dtype)))
        return out if return_dict else (out.latent_dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents [B, 16, h, w] -> images [B, 3, 4h, 4w] in about [-1, 1]."""
        z = z.float() * self.scale[None, :, None, None]
        patches = torch.einsum("bchw,dc->bdhw", z, self.basis) + self.mean[None, :, None, None]
        images = torch.nn.functional.pixel_shuffle(patches, self.config.patch_size)
        return DecoderOutput(sample=images) if return_dict else (images,)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> float:
        """Fit mean, basis and scale to images [N, 3, H, W] in [0, 1]; returns the fraction of variance kept."""
        x = images.float() * 2 - 1
        patches = torch.nn.functional.pixel_unshuffle(x, self.config.patch_size)  # [N, 48, h, w]
        flat = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).double()  # [N h w, 48]
        mean = flat.mean(0)
        cov = torch.cov((flat - mean).T)
        evals, evecs = torch.linalg.eigh(cov)                                     # ascending
        order = torch.argsort(evals, descending=True)[: self.config.latent_channels]
        self.mean.copy_(mean.float())
        self.basis.copy_(evecs[:, order].float())
        self.scale.copy_(evals[order].clamp_min(1e-8).sqrt().float())
        return float(evals[order].sum() / evals.sum())


def fit_codec(images: np.ndarray, latent_channels: int = 16, patch_size: int = 4) -> tuple[PatchPCACodec, float]:
    """A codec fitted to images [N, H, W, 3] float in [0, 1]: (codec, fraction of patch variance kept)."""
    codec = PatchPCACodec(patch_size=patch_size, latent_channels=latent_channels)
    kept = codec.fit(torch.from_numpy(images).permute(0, 3, 1, 2))
    return codec.eval(), kept
