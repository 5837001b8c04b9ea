"""Sample diversity of a prompt set: how different the images of one prompt are across seeds.

Two pixel-space figures, computed offline (no feature network, so nothing to download). For each prompt with at
least two images, average over all pairs (i < j) of its images; then average over prompts:

- `diversity/pairwise_rms`: root-mean-square difference of RGB values in [0, 1], sqrt(mean((x_i - x_j)^2)).
  0 for identical images, 1 for black vs white.
- `diversity/one_minus_ssim`: 1 - SSIM(x_i, x_j) on luma (Y = 0.299 R + 0.587 G + 0.114 B), SSIM as in Wang et al.
  (2004) with a 7x7 uniform window, population statistics, C1 = 0.01^2, C2 = 0.03^2 (data range 1), averaged over
  the valid window positions. 0 for identical images, up to 2.

Departure from the paper: the paper reports no diversity figure; papers that do usually use a learned feature
distance (LPIPS, DINO), which these pixel figures only approximate (they also count colour shifts and noise).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SSIM_WINDOW = 7
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
LUMA = (0.299, 0.587, 0.114)


def pairwise_rms(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of sqrt(mean((x_i - x_j)^2)); images [S, 3, H, W] in [0, 1], S >= 2 -> scalar."""
    x = images.float().flatten(1)                                          # [S, 3 H W]
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[1] ** 0.5  # [S, S] RMS
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return d[i, j].mean()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM on luma between image batches a, b [N, 3, H, W] in [0, 1] (H, W >= 7) -> [N]."""
    weights = torch.tensor(LUMA).view(1, 3, 1, 1)
    ya, yb = (a.float() * weights).sum(1, keepdim=True), (b.float() * weights).sum(1, keepdim=True)  # [N, 1, H, W]

    def box(t):
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)                      # local means, valid positions only

    mu_a, mu_b = box(ya), box(yb)
    var_a, var_b = box(ya * ya) - mu_a**2, box(yb * yb) - mu_b**2
    cov = box(ya * yb) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2))                # [N, 1, H - 6, W - 6]
    return s.mean(dim=(1, 2, 3))                                           # [N]


def pairwise_one_minus_ssim(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of 1 - SSIM(x_i, x_j); images [S, 3, H, W] in [0, 1], S >= 2 -> scalar."""
    i, j = torch.triu_indices(len(images), len(images), offset=1)
    return (1 - ssim(images[i], images[j])).mean()


def prompt_diversity(images: torch.Tensor, groups: Sequence[int]) -> dict[str, float]:
    """Both figures for images [N, 3, H, W] in [0, 1]; `groups[n]` names the prompt of image n.

    Prompts with a single image are skipped; at least one prompt needs two images.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    if len(groups) != len(images):
        raise ValueError(f"groups must name one prompt per image: {len(groups)} groups for {len(images)} images")
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} for SSIM, got "
                         f"{tuple(images.shape[-2:])}")
    members: dict[int, list[int]] = defaultdict(list)
    for n, g in enumerate(groups):
        members[g].append(n)
    multi = [idx for idx in members.values() if len(idx) >= 2]
    if not multi:
        raise ValueError("diversity needs at least one prompt with two or more images (several seeds per prompt)")
    rms = torch.stack([pairwise_rms(images[idx]) for idx in multi]).mean()
    dssim = torch.stack([pairwise_one_minus_ssim(images[idx]) for idx in multi]).mean()
    return {"diversity/pairwise_rms": float(rms), "diversity/one_minus_ssim": float(dssim)}
