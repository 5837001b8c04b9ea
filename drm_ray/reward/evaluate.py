"""DRM evaluation: preference accuracy on held-out pairs at several noise levels t, with tie-aware accuracy.

At each t (timestep units, s = t / 1000) both images of a pair are noised at s with noise drawn from a fixed seed,
so every DRM sees the same noisy inputs. Accuracy counts non-tie pairs where r_w > r_l. Where the data has ties,
tie-aware accuracy (as in the Pick-a-Pic protocol) predicts a tie when |r_w - r_l| < tau and reports the best tau
over all pairs, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drm_ray.data.cache import iter_pairs
from drm_ray.diffusion.flow import add_noise

DEFAULT_TIMESTEPS = (0, 250, 500, 750, 950)


@dataclass
class EvalRow:
    t: int
    accuracy: float          # non-tie pairs
    pairs: int
    tie_aware_accuracy: float | None
    tie_threshold: float | None
    ties: int


@torch.no_grad()
def score_pairs_at(drm, cache_dir, t: int, batch_size: int = 64, seed: int = 0):
    """Rewards of every cached pair noised at s = t / 1000: -> r_w [N], r_l [N], label [N]."""
    device = drm.device
    s_value = t / 1000.0
    rw, rl, labels = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for batch in iter_pairs(cache_dir, batch_size):
        n = len(batch)
        eps = torch.randn((2, *batch.latent_win.shape), generator=gen)  # [2, B, C, h, w]
        s = torch.full((n,), s_value)
        x_w = add_noise(batch.latent_win, eps[0], s).to(device)
        x_l = add_noise(batch.latent_lose, eps[1], s).to(device)
        emb, pooled = batch.prompt_embeds.to(device), batch.pooled.to(device)
        r = drm(torch.cat([x_w, x_l]), torch.cat([s, s]).to(device), emb.repeat(2, 1, 1), pooled.repeat(2, 1))
        rw.append(r[:n].cpu())
        rl.append(r[n:].cpu())
        labels.append(batch.label)
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
        r_w, r_l, label = score_pairs_at(drm, cache_dir, t, batch_size, seed + t)
        strict = label == 1.0
        acc = (r_w[strict] > r_l[strict]).float().mean().item() if strict.any() else float("nan")
        ties = int((label == 0.5).sum())
        tie_acc, tau = tie_aware_accuracy(r_w, r_l, label) if ties else (None, None)
        rows.append(EvalRow(t, acc, int(strict.sum()), tie_acc, tau, ties))
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
