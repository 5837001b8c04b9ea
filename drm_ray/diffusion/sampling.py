"""The denoising loop, written out: classifier-free guidance, SDE or ODE steps, VAE decoding.

Matches diffusers' `StableDiffusion3Pipeline` when the noise level is 0 (a test checks it): same initial noise from
the generator(s), the scheduler's sigmas, `timestep = 1000 s`, CFG `v = v_u + w (v_c - v_u)` with the
unconditional half first. With noise level a > 0 every step but the last is the Flow-GRPO SDE step; the last step is
deterministic (its std is tiny and it is never trained), the same convention Step-wise Sampling uses.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from drm_ray.diffusion.flow import euler_step, sde_step_with_logprob


def predict_velocity(transformer, x: torch.Tensor, sigma: float | torch.Tensor, embeds: torch.Tensor,
                     pooled: torch.Tensor,
                     neg_embeds: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None,
                     guidance_scale: float = 1.0) -> torch.Tensor:
    """v(x, s, c) with CFG when `neg_embeds` is given and w > 1: one batched forward over [uncond; cond].

    x [B, C, H, W] (any dtype; cast to the transformer's), sigma a float or [B], embeds [B, L, D], pooled [B, P]
    -> v [B, C, H, W] float32.
    """
    dtype = transformer.dtype
    cfg = neg_embeds is not None and guidance_scale > 1.0
    if cfg:
        x_in = torch.cat([x, x])
        embeds = torch.cat([neg_embeds, embeds])
        pooled = torch.cat([neg_pooled, pooled])
    else:
        x_in = x
    if isinstance(sigma, torch.Tensor):
        timestep = (1000.0 * sigma.to(device=x.device, dtype=torch.float32)).repeat(2 if cfg else 1)
    else:
        timestep = torch.full((x_in.shape[0],), 1000.0 * sigma, device=x.device, dtype=torch.float32)
    out = transformer(hidden_states=x_in.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                      pooled_projections=pooled.to(dtype), return_dict=False)[0].float()
    if not cfg:
        return out
    v_u, v_c = out.chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def initial_latents(batch: int, channels: int, latent_size: int, generator=None, device="cpu") -> torch.Tensor:
    """x_1 ~ N(0, I) the way diffusers draws it (one generator, or one per item): [B, C, h, w] float32."""
    return randn_tensor((batch, channels, latent_size, latent_size), generator=generator,
                        device=torch.device(device), dtype=torch.float32)


@torch.no_grad()
def denoise(transformer, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
            neg_embeds: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None,
            guidance_scale: float = 1.0, noise_level: float = 0.0, latents: torch.Tensor | None = None,
            generator=None) -> torch.Tensor:
    """Sample latents [B, C, h, w] from x_1 along `sigmas` ([N + 1], from `schedule_sigmas`)."""
    if latents is None:
        raise ValueError("pass initial latents (initial_latents(...)) so the caller owns the seeding")
    x = latents.float()
    n = len(sigmas) - 1
    for i in range(n):
        v = predict_velocity(transformer, x, float(sigmas[i]), embeds, pooled, neg_embeds, neg_pooled,
                             guidance_scale)
        if noise_level > 0 and i < n - 1:
            x = sde_step_with_logprob(x, v, sigmas, i, noise_level, k=1, generator=generator).sample[:, 0]
        else:
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def denoised_estimate(transformer, x: torch.Tensor, sigma: float | torch.Tensor, embeds: torch.Tensor,
                      pooled: torch.Tensor, neg_embeds: torch.Tensor | None = None,
                      neg_pooled: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """x0_hat = x_s - s * v(x_s, s, c): the clean latent the policy predicts from a noisy one (one policy forward,
    the CFG pair), which a clean-image reward can score at any step. float32, [B, C, H, W]."""
    v = predict_velocity(transformer, x, sigma, embeds, pooled, neg_embeds, neg_pooled, guidance_scale)
    s = sigma.to(x.device, torch.float32).view(-1, 1, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
    return x.float() - s * v


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3 latents -> images [B, 3, H, W] in [0, 1], float32."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> SD3 latents (E(x) - shift) * scale, the posterior mean. float32."""
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images."""
    arr = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
