"""Branching rollouts for Step-GRPO and GRPO: trajectories with k SDE children at the branching steps.

At a branching step one policy forward (the CFG pair) gives the shared mean, k children are drawn from it with their
log-probs under the current policy, and the trajectory continues from one child: uniformly random (default; keeps
the states on-policy, so scoring need not block sampling), the best-scored (needs a scorer), or the ODE mean (the
deterministic Euler step from the same state). Steps that do not branch are deterministic Euler steps, as
Flow-GRPO-Fast samples outside its training window; the last step is always Euler and never trained.

GRPO reuses this with k = 1 on k copies of each prompt: each copy is an independent SDE trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drm_ray.diffusion.flow import euler_step, sde_step_with_logprob
from drm_ray.diffusion.sampling import predict_velocity

# scorer(children [N, C, h, w], noise levels [N], batch rows [N]) -> scores [N]: the caller knows each row's prompt
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BranchingRollout:
    states: torch.Tensor      # [B, S, C, h, w] the state x before each branching step
    children: torch.Tensor    # [B, S, k, C, h, w]
    log_probs: torch.Tensor   # [B, S, k] under the policy that sampled them
    chosen: torch.Tensor      # [B, S] index of the child the trajectory continued from (-1: the ODE mean)
    final: torch.Tensor       # [B, C, h, w] the final latent
    steps: tuple[int, ...]    # the S branching step indices


@torch.no_grad()
def branching_rollout(transformer, sigmas: torch.Tensor, latents: torch.Tensor, embeds: torch.Tensor,
                      pooled: torch.Tensor, neg_embeds: torch.Tensor | None, neg_pooled: torch.Tensor | None,
                      guidance_scale: float, noise_level: float, k: int, branch_steps: tuple[int, ...],
                      generators: list[torch.Generator], continuation: str = "random",
                      scorer: Scorer | None = None) -> BranchingRollout:
    """Denoise `latents` [B, C, h, w] along `sigmas`, branching k ways at `branch_steps` (each < len(sigmas) - 2)."""
    n = len(sigmas) - 1
    if any(not 0 <= i < n - 1 for i in branch_steps):
        raise ValueError(f"branch_steps {branch_steps} must lie in [0, {n - 2}]: the last step is never trained")
    if continuation == "best" and scorer is None:
        raise ValueError("continuation='best' needs a scorer")
    x = latents.float()
    b = x.shape[0]
    states, children, log_probs, chosen = [], [], [], []
    for i in range(n):
        v = predict_velocity(transformer, x, float(sigmas[i]), embeds, pooled, neg_embeds, neg_pooled,
                             guidance_scale)
        if i not in branch_steps:
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            continue
        step = sde_step_with_logprob(x, v, sigmas, i, noise_level, k=k, generator=generators)
        states.append(x)
        children.append(step.sample)  # [B, k, C, h, w]
        log_probs.append(step.log_prob)
        if continuation == "random":
            pick = torch.stack([torch.randint(k, (1,), generator=g)[0] for g in generators])  # [B]
        elif continuation == "best":
            flat = step.sample.flatten(0, 1)  # [B * k, C, h, w]
            rows = torch.arange(b).repeat_interleave(k)  # the batch row (prompt) of each child
            scores = scorer(flat, torch.full((b * k,), float(sigmas[i + 1])), rows).view(b, k)
            pick = scores.argmax(dim=1)
        else:  # "mean": continue on the deterministic path
            pick = torch.full((b,), -1, dtype=torch.long)
        chosen.append(pick)
        if continuation == "mean":
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        else:
            x = step.sample[torch.arange(b), pick.to(step.sample.device)]
    return BranchingRollout(torch.stack(states, 1), torch.stack(children, 1), torch.stack(log_probs, 1),
                            torch.stack(chosen, 1), x, tuple(branch_steps))
