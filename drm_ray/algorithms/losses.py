"""Losses as pure tensor functions: tensors in, a scalar loss and a small stats dict out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)  # names: s0 (exactly clean), then s0.00-0.25 for (0, .25], (.25, .5], (.5, .75], (.75, 1]


def bradley_terry_loss(r_win: torch.Tensor, r_lose: torch.Tensor,
                       label: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(r_w - r_l), averaged over pairs: r_win, r_lose [B] -> scalar loss, {accuracy, margin}.

    With `label` [B] (the probability that the first image is preferred; 1 for a plain preference) the loss is the
    cross-entropy of Bradley-Terry's P(w > l) = sigmoid(r_w - r_l) with that soft target:
    -(p log sigmoid(m) + (1 - p) log sigmoid(-m)), which is the plain loss where p = 1.
    """
    margin = r_win.float() - r_lose.float()  # [B]
    if label is None:
        loss = -F.logsigmoid(margin).mean()
    else:
        p = label.to(margin.device, torch.float32)
        loss = -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


def accuracy_by_noise_bucket(r_win: torch.Tensor, r_lose: torch.Tensor, sigma: torch.Tensor) -> dict[str, tuple]:
    """{bucket name: (correct, count)} over the noise levels of the pairs: r_win, r_lose, sigma [B]."""
    correct = (r_win > r_lose).float()
    out = {"s0": (correct[sigma == 0].sum().item(), int((sigma == 0).sum()))}
    for lo, hi in zip(NOISE_BUCKETS[:-1], NOISE_BUCKETS[1:]):
        mask = (sigma > lo) & (sigma <= hi)
        out[f"s{lo:.2f}-{hi:.2f}"] = (correct[mask].sum().item(), int(mask.sum()))
    return out


def clipped_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate per child: all [N, m] -> per-child loss [N, m] and per-child stats.

    rho = exp(logp_new - logp_old); loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)). Returned unreduced so the
    caller can weight micro-batches exactly; stats are per child too (ratio, clipped indicator, approx KL).
    """
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"ratio": ratio.detach(), "clipped": ((ratio - 1).abs() > clip_eps).float(),
                 "approx_kl": 0.5 * log_ratio.detach() ** 2}
    return loss, stats
