"""DRM evaluation: preference accuracy on held-out pairs at several noise levels t, with tie-aware accuracy.

At each t (timestep units, s = t / 1000) both images of a pair are noised at s with noise keyed by (seed, t, pair
index), so every DRM sees the same noisy inputs whatever the batching (validation during training uses the same
noise). Accuracy counts non-tie pairs where r_w > r_l. Where the data has ties, tie-aware accuracy (as in the
Pick-a-Pic protocol) predicts a tie when |r_w - r_l| < tau and reports the best tau over all pairs, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drm_ray.data.cache import iter_pairs
from drm_ray.reward.model import score_noised_pairs

DEFAULT_TIMESTEPS = (0, 250, 500, 750, 950)


@dataclass
class EvalRow:
    t: int
    accuracy: float          # non-tie pairs
    pairs: int
    tie_aware_accuracy: float | None
    tie_threshold: float | None
    ties: int
    # r_w - r_l of every non-tie pair, in cache order (pair i is noised alike for every DRM: paired comparisons)
    margins: list[float] = field(default_factory=list, repr=False)


def heldout_noise(seed: int, t: int, indices: torch.Tensor, latent_shape) -> torch.Tensor:
    """Fixed noise of the held-out pairs `indices` at timestep t, keyed per pair (so it does not depend on batching
    or on how pairs are split over ranks): -> [2, b, C, h, w] (winner, loser)."""
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + t * 100_003 + i) for i in indices.tolist()]
    rows = [torch.randn((2, *latent_shape), generator=g) for g in gens]  # each [2, C, h, w]
    return torch.stack(rows, dim=1) if rows else torch.zeros((2, 0, *latent_shape))


@torch.no_grad()
def score_pairs_at(drm, cache_dir, t: int, batch_size: int = 64, seed: int = 0):
    """Rewards of every cached pair noised at s = t / 1000: -> r_w [N], r_l [N], label [N]."""
    device = drm.device
    rw, rl, labels, offset = [], [], [], 0
    for batch in iter_pairs(cache_dir, batch_size):
        n = len(batch)
        eps = heldout_noise(seed, t, torch.arange(offset, offset + n), batch.latent_win.shape[1:])  # [2, B, C, h, w]
        r_w, r_l = score_noised_pairs(drm, batch.to(device), torch.full((n,), t / 1000.0), eps)
        rw.append(r_w.cpu())
        rl.append(r_l.cpu())
        labels.append(batch.label)
        offset += n
    return torch.cat(rw), torch.cat(rl), torch.cat(labels)


def tie_aware_accuracy(r_w: torch.Tensor, r_l: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """Best accuracy over thresholds tau when |margin| < tau predicts a tie: -> (accuracy, tau)."""
    margin = r_w - r_l  # [N]
    is_tie = label == 0.5
    best = (-1.0, 0.0)
    for tau in [0.0] + sorted(margin.abs().tolist()):
        pred_tie = margin.abs() < tau
        correct = torch.where(is_tie, pred_tie, ~pred_tie & (margin > 0))
        acc = correct.float().mean().item()
        if acc > best[0]:
            best = (acc, tau)
    return best


def evaluate_drm(drm, cache_dir, timesteps=DEFAULT_TIMESTEPS, batch_size: int = 64, seed: int = 0) -> list[EvalRow]:
    rows = []
    for t in timesteps:
        r_w, r_l, label = score_pairs_at(drm, cache_dir, t, batch_size, seed)
        strict = label > 0.5  # a soft label (0.5, 1) still names the preferred image
        acc = (r_w[strict] > r_l[strict]).float().mean().item() if strict.any() else float("nan")
        ties = int((label == 0.5).sum())
        tie_acc, tau = tie_aware_accuracy(r_w, r_l, label) if ties else (None, None)
        rows.append(EvalRow(t, acc, int(strict.sum()), tie_acc, tau, ties, (r_w - r_l)[strict].tolist()))
    return rows


def format_table(rows: list[EvalRow]) -> str:
    lines = ["   t  accuracy  pairs  tie-aware  tau     ties", "-" * 48]
    for r in rows:
        tie = f"{r.tie_aware_accuracy:9.3f}  {r.tie_threshold:6.3f}" if r.ties else "      n/a     n/a"
        lines.append(f"{r.t:4d}  {r.accuracy:8.3f}  {r.pairs:5d}  {tie}  {r.ties:5d}")
    return "\n".join(lines)


def accuracy_plot(rows: list[EvalRow], title: str = "DRM accuracy vs noise level"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r.t for r in rows], [r.accuracy for r in rows], marker="o", label="accuracy (non-tie pairs)")
    if any(r.ties for r in rows):
        ax.plot([r.t for r in rows], [r.tie_aware_accuracy for r in rows], marker="s", label="tie-aware accuracy")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("t (timestep, s = t / 1000)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig
