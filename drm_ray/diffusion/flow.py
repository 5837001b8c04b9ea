"""Rectified-flow math (SD3 conventions) and the Flow-GRPO SDE step with its log-probability.

`x_s = (1 - s) x0 + s eps`, s in [0, 1] (1 = pure noise); the DiT predicts v ~ eps - x0 at `timestep = 1000 s`.
Sigmas come from diffusers' `FlowMatchEulerDiscreteScheduler`; nothing here rebuilds them.

The SDE step follows ARCHITECTURE.md: all k children of a state share one mean `mu` (one policy forward serves the
group), the math is float32 whatever the model dtype, the log-prob is the Gaussian density averaged over C, H, W, and
gradients flow only through `mu` (children are detached). With noise level 0 the step is the plain Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def schedule_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int) -> torch.Tensor:
    """The scheduler's own sigmas for `num_steps` steps, float32 on CPU: [num_steps + 1], ending in 0."""
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.detach().to(torch.float32).clone()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps, with one s per batch item: x0, eps [B, ...], s [B]."""
    s = s.to(torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0.float() + s * eps.float()


def sample_noise_levels(n: int, generator: torch.Generator | None = None, zero_prob: float = 0.1,
                        shift: float = 3.0) -> torch.Tensor:
    """DRM training noise levels: s = shift u / (1 + (shift - 1) u), u ~ U(0, 1); s = 0 with prob `zero_prob`. [n]"""
    u = torch.rand(n, generator=generator)
    s = shift * u / (1 + (shift - 1) * u)
    clean = torch.rand(n, generator=generator) < zero_prob
    return torch.where(clean, torch.zeros_like(s), s)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor):
    """The deterministic flow step x' = x + (s' - s) v, in float32."""
    return x.float() + (sigma_next - sigma) * v.float()


@dataclass
class SDEStep:
    sample: torch.Tensor          # [B, k, C, H, W] children (detached)
    log_prob: torch.Tensor | None  # [B, k] mean over C, H, W; None when the step is deterministic
    mean: torch.Tensor            # [B, C, H, W] shared mean mu (carries the gradient)
    std_t: float                  # noise scale of the SDE at s
    std_step: float               # std of the child around mu


def sde_coefficients(sigmas: torch.Tensor, i: int, noise_level: float) -> tuple[float, float, float, float]:
    """(s, dt, std_t, std_step) for the step sigmas[i] -> sigmas[i + 1]."""
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = s_next - s
    s_safe = float(sigmas[1]) if s == 1.0 else s  # avoids dividing by zero at s = 1
    std_t = noise_level * math.sqrt(s / (1 - s_safe))
    return s, dt, std_t, std_t * math.sqrt(-dt)


def sde_step_with_logprob(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int, noise_level: float,
                          k: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                          children: torch.Tensor | None = None) -> SDEStep:
    """One reverse SDE step from sigmas[i] to sigmas[i + 1] for k children of each state.

    x, v: [B, C, H, W] state and predicted velocity. Draws k children per state from `generator` (one generator,
    or one per batch item so that each item's noise does not depend on its batch), unless `children`
    [B, k, C, H, W] is given, in which case their log-prob under this step is computed (training).
    """
    s, dt, std_t, std_step = sde_coefficients(sigmas, i, noise_level)
    x, v = x.float(), v.float()
    if std_t == 0.0 and children is not None:
        raise ValueError("children have no log-probability under a deterministic step (noise level 0)")
    if std_t == 0.0:
        mean = x + dt * v
        return SDEStep(mean.detach().unsqueeze(1).expand(-1, k, *mean.shape[1:]).clone(), None, mean, 0.0, 0.0)
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt  # [B, C, H, W]
    if children is None:
        shape = (x.shape[0], k, *x.shape[1:])
        eps = randn_tensor(shape, generator=generator, device=x.device, dtype=torch.float32)  # [B, k, C, H, W]
        children = mean.detach().unsqueeze(1) + std_step * eps
    children = children.detach().float()
    return SDEStep(children, gaussian_log_prob(children, mean.unsqueeze(1), std_step), mean, std_t, std_step)


def sde_mean_per_item(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, step_index: torch.Tensor,
                      noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SDE step's mean for a batch whose items sit at different steps (the learner's micro-batches).

    x, v [B, C, H, W], step_index [B] -> mean [B, C, H, W] (differentiable in v), std_t [B], std_step [B];
    the same formula as `sde_step_with_logprob`, with every coefficient per item.
    """
    sig = sigmas.to(x.device, torch.float32)
    i = step_index.to(x.device)
    s, s_next = sig[i], sig[i + 1]  # [B]
    dt = s_next - s
    s_safe = torch.where(s == 1.0, sig[1].expand_as(s), s)
    std_t = noise_level * torch.sqrt(s / (1 - s_safe))
    std_step = std_t * torch.sqrt(-dt)
    b = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731 - broadcast [B] over C, H, W
    x, v = x.float(), v.float()
    mean = x * (1 + b(std_t**2 * dt / (2 * s))) + v * b((1 + std_t**2 * (1 - s) / (2 * s)) * dt)
    return mean, std_t, std_step


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over the last three dims (C, H, W): [..., C, H, W] -> [...].

    `std` is a float or a tensor broadcastable to x (e.g. [B, 1, 1, 1, 1] for per-item stds).
    """
    log_std = torch.log(std) if isinstance(std, torch.Tensor) else math.log(std)
    lp = -((x - mean) ** 2) / (2 * std**2) - log_std - LOG_SQRT_2PI
    return lp.mean(dim=(-3, -2, -1))


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """KL between Gaussians of equal std: mean over C, H, W of (mu - mu_ref)^2 / (2 std^2). [B, C, H, W] -> [B]

    ARCHITECTURE.md uses std = std_t; Flow-GRPO's code divides by std_step^2 instead (a factor 1/|dt|, i.e. a
    rescaled beta).
    """
    return ((mean.float() - mean_ref.float()) ** 2).mean(dim=(-3, -2, -1)) / (2 * std**2)  # std: float or [B]
