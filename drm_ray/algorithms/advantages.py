"""Advantages as pure tensor functions.

Step-GRPO: for each branching group (one state, its k children) `A_j = (r_j - mean) / (std + 1e-4)`, clipped to
[-clip, clip]. GRPO: the same normalization over the k final images of one prompt, repeated on every trained step.
`norm="mean"` (`grpo.adv_norm`) keeps `A_j = r_j - mean` (Dr. GRPO): a group counts by its reward spread, so a group
whose members differ by a hair is not scaled up to unit variance like one whose members differ in kind.
A group whose scores are all equal gets zero advantages (never NaN); a group with a non-finite score is dropped
(its mask is False) and counted, so no NaN ever reaches the optimizer.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
ADV_NORMS = ("std", "mean")


def group_advantages(scores: torch.Tensor, clip: float = 5.0,
                     norm: str = "std") -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Normalize over the last dim (the k members of a group): `norm="std"` centres and divides by the group's
    standard deviation, `norm="mean"` only centres.

    scores [..., k] -> advantages [..., k] (0 where the group is dropped), valid [...] (False: a non-finite score),
    stats {adv/mean, adv/std, adv/abs_max, adv/zero_std_frac, adv/dropped_groups}.
    """
    scores = scores.float()
    valid = torch.isfinite(scores).all(dim=-1)  # [...]
    safe = torch.where(valid.unsqueeze(-1), scores, torch.zeros_like(scores))
    mean = safe.mean(dim=-1, keepdim=True)
    std = safe.std(dim=-1, keepdim=True, unbiased=False)
    if norm not in ADV_NORMS:
        raise ValueError(f"advantage normalization {norm!r}: expected one of {ADV_NORMS}")
    centred = safe - mean
    adv = (centred / (std + STD_EPS) if norm == "std" else centred).clamp(-clip, clip)
    adv = torch.where(valid.unsqueeze(-1), adv, torch.zeros_like(adv))
    return adv, valid, advantage_stats(adv, valid, (std.squeeze(-1) < 1e-6) & valid)


def advantage_stats(adv: torch.Tensor, valid: torch.Tensor, zero_std: torch.Tensor) -> dict[str, float]:
    """adv/* of advantages [..., k] over the kept groups (`valid` [...]); `zero_std` [...]: groups with no spread."""
    kept = adv[valid]
    return {
        "adv/mean": kept.mean().item() if kept.numel() else 0.0,
        "adv/std": kept.std(unbiased=False).item() if kept.numel() else 0.0,
        "adv/abs_max": kept.abs().max().item() if kept.numel() else 0.0,
        "adv/zero_std_frac": zero_std.float().sum().item() / max(valid.sum().item(), 1),
        "adv/dropped_groups": float((~valid).sum().item()),
    }


def combine_rewards(scores: torch.Tensor, weights: list[float] | None = None, clip: float = 5.0, norm: str = "std"):
    """Several rewards combined at the advantage level: scores [..., k, R] (R rewards) -> the weighted mean of the
    per-reward group advantages, `A = sum_r w_r A_r / sum_r w_r` ([..., k]), valid [...] (every reward finite), stats.

    Each reward is normalized within the group before weighting, so its scale does not matter (a DRM logit, a
    CLIP logit around 20 and an oracle grade in [0, 1] count by their weights alone); a weighted sum of raw scores
    (Flow-GRPO's multi-reward) would let the widest-spread reward dominate unless the weights undo the scales.
    With one reward this is `group_advantages` exactly. With `norm="mean"` the rewards are only centred, so their
    scales do count: give weights that bring them to a common scale.
    """
    if scores.shape[-1] == 1:
        return group_advantages(scores[..., 0], clip, norm)
    w = torch.tensor(weights if weights is not None else [1.0] * scores.shape[-1], dtype=torch.float32)
    parts = [group_advantages(scores[..., r], clip, norm) for r in range(scores.shape[-1])]
    valid = torch.stack([v for _, v, _ in parts]).all(dim=0)  # [...]
    adv = sum(wr * a for wr, (a, _, _) in zip(w, parts)) / w.sum()  # [..., k]
    adv = torch.where(valid.unsqueeze(-1), adv, torch.zeros_like(adv))
    zero_std = (scores.float().std(dim=-2, unbiased=False) < 1e-6).all(dim=-1) & valid  # every reward flat
    return adv, valid, advantage_stats(adv, valid, zero_std)


def step_group_advantages(child_scores: torch.Tensor, clip: float = 5.0, weights: list[float] | None = None,
                          norm: str = "std"):
    """Step-GRPO: child_scores [G, S, k] (G prompts, S branching steps, k children), or [G, S, k, R] for R rewards
    with `weights` -> adv [G, S, k], valid [G, S]."""
    if weights is not None:
        return combine_rewards(child_scores, weights, clip, norm)
    return group_advantages(child_scores, clip, norm)


def grpo_advantages(final_scores: torch.Tensor, num_steps: int, clip: float = 5.0,
                    weights: list[float] | None = None, norm: str = "std"):
    """GRPO: final_scores [G, k] (k images per prompt), or [G, k, R] with `weights` -> adv [G, S, k] (repeated over
    S steps), valid [G, S]."""
    if weights is not None:
        adv, valid, stats = combine_rewards(final_scores, weights, clip, norm)  # [G, k], [G]
    else:
        adv, valid, stats = group_advantages(final_scores, clip, norm)  # [G, k], [G]
    return (adv.unsqueeze(1).expand(-1, num_steps, -1).contiguous(),
            valid.unsqueeze(1).expand(-1, num_steps).contiguous(), stats)
