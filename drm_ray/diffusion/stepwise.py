"""Step-wise Sampling: training-free, DRM-guided explore-and-select denoising for a batch of prompts.

At every step but the last: one policy forward (the CFG pair) gives the shared SDE mean, k children are drawn
around it (`sde_step_with_logprob(..., k=k)`), the scorer rates all B * k children of the batch in ONE call at the
children's noise level `sigmas[i + 1]` (ARCHITECTURE.md: "a candidate produced by a step into s' is scored at s'"),
and the best-scored child continues. The last step is a deterministic Euler step, as in `denoise`.

The scorer is any callable `scorer(latents [N, C, h, w], noise_levels [N], rows [N]) -> [N]`, where rows[i] is
the batch row (prompt) latent i belongs to: the caller maps rows to its prompts (`StepwiseSampler` asks a
`RewardScorer` by prompt index, with the children's x0_hat when image rewards select).

Equivalences (tested): with k = 1 the scorer is never called and the result equals `denoise(..., noise_level=a)`
with the same per-item generators, bit for bit (both draw each step's noise as one [1, k, C, h, w] tensor per
generator); with noise level 0 every child equals the Euler step, so the result equals ODE sampling.

Departure from the paper: none in the selection rule. Scores and spreads are recorded at every branching step
(NaN where k = 1, since nothing is scored); the final sample is not scored here (the caller may).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from drm_ray.diffusion.flow import euler_step, sde_step_with_logprob
from drm_ray.diffusion.sampling import predict_velocity

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepwiseResult:
    latents: torch.Tensor   # [B, C, h, w] final latents, float32
    scores: torch.Tensor    # [B, steps - 1] score of the selected child at each branching step (NaN when k = 1)
    spread: torch.Tensor    # [B, steps - 1] max - min of the k scores
    score_std: torch.Tensor  # [B, steps - 1] population std (correction 0) of the k scores
    chosen: torch.Tensor    # [B, steps - 1] int64 index of the selected child (0 when k = 1)


@torch.no_grad()
def stepwise_sample(transformer, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                    latents: torch.Tensor, *, k: int, noise_level: float,
                    generator: torch.Generator | list[torch.Generator] | None, scorer: Scorer | None = None,
                    neg_embeds: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None,
                    guidance_scale: float = 1.0) -> StepwiseResult:
    """Denoise `latents` [B, C, h, w] (x_1) along `sigmas` [N + 1], keeping the best of k SDE children per step.

    Pass one generator per prompt (`generator=[g_0, ..., g_{B-1}]`, the ones that drew `latents`) so an image does
    not depend on the batch it was sampled in.
    """
    _check_inputs(sigmas, embeds, pooled, latents, k, noise_level, generator, scorer)
    x = latents.float()                                                    # [B, C, h, w]
    b, n = x.shape[0], len(sigmas) - 1
    nan = torch.full((b, n - 1), math.nan)
    scores, spread, score_std = nan.clone(), nan.clone(), nan.clone()
    chosen = torch.zeros(b, n - 1, dtype=torch.long)
    rows = torch.arange(b).repeat_interleave(k)                            # [B * k] batch row of each child
    for i in range(n):
        v = predict_velocity(transformer, x, float(sigmas[i]), embeds, pooled, neg_embeds, neg_pooled,
                             guidance_scale)                               # [B, C, h, w]
        if i == n - 1:
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            break
        children = sde_step_with_logprob(x, v, sigmas, i, noise_level, k=k, generator=generator).sample
        if k == 1:                                                         # children: [B, k, C, h, w]
            x = children[:, 0]
            continue
        levels = sigmas[i + 1].to(torch.float32).expand(b * k).clone()    # [B * k]
        r = _call_scorer(scorer, children.flatten(0, 1), levels, rows, b * k).view(b, k)  # [B, k]
        best = r.argmax(dim=1)                                             # [B], first index on ties
        x = children[torch.arange(b, device=children.device), best.to(children.device)]  # [B, C, h, w]
        scores[:, i] = r.gather(1, best[:, None])[:, 0]
        spread[:, i] = r.max(dim=1).values - r.min(dim=1).values
        score_std[:, i] = r.std(dim=1, correction=0)
        chosen[:, i] = best
    return StepwiseResult(latents=x, scores=scores, spread=spread, score_std=score_std, chosen=chosen)


def _call_scorer(scorer: Scorer, latents: torch.Tensor, levels: torch.Tensor, rows: torch.Tensor,
                 n: int) -> torch.Tensor:
    r = scorer(latents, levels, rows)
    if not isinstance(r, torch.Tensor) or r.shape != (n,):
        got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"scorer must return a tensor of shape [{n}] (one score per child), got {got}")
    return r.detach().float().cpu()                                        # [N]


def _check_inputs(sigmas, embeds, pooled, latents, k, noise_level, generator, scorer) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (children per step), got {k!r}")
    if k > 1 and scorer is None:
        raise ValueError(f"scorer is required when k > 1 (got k={k}): it picks the best child at each step")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries (schedule_sigmas), got shape "
                         f"{tuple(sigmas.shape)}")
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    b = latents.shape[0]
    if embeds.shape[0] != b or pooled.shape[0] != b:
        raise ValueError(f"embeds ({embeds.shape[0]}) and pooled ({pooled.shape[0]}) must have one row per latent "
                         f"({b})")
    if isinstance(generator, list) and len(generator) != b:
        raise ValueError(f"generator: pass one generator per prompt ({b}), got a list of {len(generator)}")
