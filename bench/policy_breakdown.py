"""Benchmark tool: what the toy policy gets wrong, and where GRPO's within-group reward signal comes from.

    python bench/policy_breakdown.py --model outputs/r6/pretrained            # the reproduction's pre-trained policy
    python bench/policy_breakdown.py --model outputs/r6/pretrained --k 8 --seeds 4 --out breakdown.md

Two measurements of one toy checkpoint, both graded by the oracle:

1. ODE samples (the evaluation panel's sampler) of every caption x `--seeds`: oracle mean, `correct` and each
   component, by caption kind (one circle / square / triangle, two objects).
2. GRPO's groups: k SDE samples (the rollout's sampler, noise_level of the preset) of every caption. The oracle score
   is a sum of four terms (0.75 x 0.4 x colour, 0.75 x 0.3 x colour x shape, 0.75 x 0.3 x colour x placement,
   0.25 x cleanliness); the variance of each term within a group says which criterion GRPO's advantages are made of
   (the terms' covariances make up the rest of the score's within-group variance). Also: the share of groups that
   hold both a `correct` and an incorrect image, and the share of images with an extra object (one in another
   caption colour, which the caption does not mention) and of groups with and without one.

Plus the shape classifier's two features (fill ratio of the bounding box, bottom-minus-top width) on the policy's
ODE samples beside their values on crisp renders: the oracle's shape prototypes are measured on renders, so a
systematic shift in the samples shows up here. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("circle", "square", "triangle", "two")


def kind_of(caption: str) -> str:
    from drm_ray.toy.world import parse_caption

    cap = parse_caption(caption)
    return "two" if cap.count == 2 else cap.shape


def group_variance(values: np.ndarray, k: int) -> float:
    """Mean over groups of the (population) variance within each group of k consecutive values."""
    return float(values.reshape(-1, k).var(axis=1).mean())


def mixed_groups(correct: np.ndarray, k: int) -> float:
    """Share of groups of k consecutive images holding both a correct and an incorrect one."""
    g = correct.reshape(-1, k)
    return float((g.any(axis=1) & ~g.all(axis=1)).mean())


def sample(comps, texts, embeds, pooled, rows: list[int], noise_level: float, steps: int, guidance: float,
           seed: int, batch: int = 360, shared: int = 1):
    """Images [N, 3, 32, 32] of caption rows `rows` (ODE when noise_level is 0); `shared` consecutive rows start
    from one initial noise (GRPO's groups with grpo.shared_initial_noise)."""
    import torch

    from drm_ray.diffusion.flow import schedule_sigmas
    from drm_ray.diffusion.sampling import decode_latents, denoise, initial_latents
    from drm_ray.toy.model import LATENT_CHANNELS, VAE_SCALE
    from drm_ray.toy.world import RESOLUTION

    empty = len(texts) - 1
    sigmas = schedule_sigmas(comps.scheduler, steps)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(rows), batch):
        idx = torch.tensor(rows[start:start + batch])
        x1 = initial_latents(len(idx) // shared, LATENT_CHANNELS, RESOLUTION // VAE_SCALE, gen)
        x1 = x1.repeat_interleave(shared, dim=0)
        with torch.no_grad():
            lat = denoise(comps.transformer, sigmas, embeds[idx], pooled[idx],
                          embeds[empty:].expand(len(idx), -1, -1), pooled[empty:].expand(len(idx), -1),
                          guidance, noise_level, x1, generator=gen)
        out.append(decode_latents(comps.vae, lat))
    return torch.cat(out)


def largest_object_features(images, captions: list[str]) -> np.ndarray:
    """The shape classifier's features of each image's largest object in its caption's colour ([N, 2]; NaN rows
    where there is none)."""
    from drm_ray.toy.oracle import MIN_OBJECT, label_components, shape_features, target_mask
    from drm_ray.toy.world import parse_caption

    arr = images.permute(0, 2, 3, 1).numpy().astype(np.float64) if hasattr(images, "permute") else images
    feats = []
    for image, text in zip(arr, captions):
        labels, n = label_components(target_mask(image, parse_caption(text).colour)[0])
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        if n == 0 or sizes.max() < MIN_OBJECT:
            feats.append([np.nan, np.nan])
        else:
            feats.append(shape_features(labels == int(np.argmax(sizes)) + 1))
    return np.asarray(feats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a toy checkpoint (jobs/pretrain_toy.py's model.path)")
    parser.add_argument("--seeds", type=int, default=4, help="ODE samples per caption")
    parser.add_argument("--k", type=int, default=8, help="SDE samples per caption (one GRPO group)")
    parser.add_argument("--noise-level", type=float, default=0.7, help="the SDE sampler's (the toy preset's 0.7)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    import torch

    from bench.common import emit_markdown

    from drm_ray.toy.model import build_toy
    from drm_ray.toy.oracle import PROTOTYPE_MEAN, has_extra_object, oracle_scores, score_terms
    from drm_ray.toy.pretrain import caption_table
    from drm_ray.toy.world import SHAPES

    torch.set_num_threads(2)
    comps = build_toy(args.model)
    texts, embeds, pooled = caption_table(comps, 16)
    n = len(texts) - 1
    kinds = np.array([kind_of(t) for t in texts[:n]])
    md = [f"# What the toy policy at {args.model} gets wrong", ""]

    ode_rows = list(range(n)) * args.seeds
    ode_images = sample(comps, texts, embeds, pooled, ode_rows, 0.0, args.steps, args.guidance, 1)
    ode = oracle_scores(ode_images, [texts[i] for i in ode_rows])
    ode_kind = kinds[ode_rows]
    ode_extra = has_extra_object(ode_images, [texts[i] for i in ode_rows])
    md += [f"ODE samples ({args.steps} steps, CFG {args.guidance}), every caption x {args.seeds} seeds:", "",
           "| captions | images | oracle | correct | colour | shape | placement | cleanliness | extra object |",
           "|---|---|---|---|---|---|---|---|---|"]
    for kind in (*KINDS, "all"):
        m = ode_kind == kind if kind != "all" else np.ones(len(ode_rows), bool)
        md.append(f"| {kind} | {m.sum()} | {ode.score[m].mean():.3f} | {100 * ode.correct[m].mean():.1f}% | "
                  f"{ode.colour[m].mean():.3f} | {ode.shape[m].mean():.3f} | {ode.placement[m].mean():.3f} | "
                  f"{ode.cleanliness[m].mean():.3f} | {100 * ode_extra[m].mean():.1f}% |")

    sde_rows = [i for i in range(n) for _ in range(args.k)]
    sde_kind = kinds[sde_rows]
    if (360 // args.k) * args.k != 360:
        parser.error("--k must divide 360 (the sampling batch)")
    for shared, title in ((1, "each from its own initial noise (GRPO's groups by default)"),
                          (args.k, "all from one initial noise (grpo.shared_initial_noise: the SDE noise is then "
                                   "the only difference within a group)")):
        sde_images = sample(comps, texts, embeds, pooled, sde_rows, args.noise_level, args.steps, args.guidance, 2,
                            shared=shared)
        sde = oracle_scores(sde_images, [texts[i] for i in sde_rows])
        sde_extra = has_extra_object(sde_images, [texts[i] for i in sde_rows])
        terms = score_terms(sde)
        md += ["", f"GRPO's groups: {args.k} SDE samples (noise_level {args.noise_level}) of every caption, {title}. "
               "Within-group variance of the oracle score and of each of its terms (mean over groups):", "",
               "| captions | groups | score mean | score var | colour term | shape term | placement term | "
               "cleanliness term | groups with correct and incorrect | extra object | groups with and without one |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind in (*KINDS, "all"):
            m = sde_kind == kind if kind != "all" else np.ones(len(sde_rows), bool)
            md.append(f"| {kind} | {m.sum() // args.k} | {sde.score[m].mean():.3f} | "
                      f"{group_variance(sde.score[m], args.k):.5f} | "
                      + " | ".join(f"{group_variance(terms[t][m], args.k):.5f}" for t in terms)
                      + f" | {100 * mixed_groups(sde.correct[m], args.k):.0f}% | {100 * sde_extra[m].mean():.1f}% | "
                      f"{100 * mixed_groups(sde_extra[m], args.k):.0f}% |")

    feats = largest_object_features(ode_images, [texts[i] for i in ode_rows])
    md += ["", "The shape classifier's features (fill ratio of the bounding box, bottom-minus-top width / box width) "
           "of the largest object, ODE samples vs the prototypes the oracle measured on crisp renders:", "",
           "| shape | samples: fill | samples: asymmetry | renders: fill | renders: asymmetry | samples graded as "
           "their shape |", "|---|---|---|---|---|---|"]
    for j, shape in enumerate(SHAPES):
        m = (ode_kind == shape) & ~np.isnan(feats[:, 0])
        md.append(f"| {shape} | {feats[m, 0].mean():.3f} +- {feats[m, 0].std():.3f} | {feats[m, 1].mean():.3f} +- "
                  f"{feats[m, 1].std():.3f} | {PROTOTYPE_MEAN[j, 0]:.3f} | {PROTOTYPE_MEAN[j, 1]:.3f} | "
                  f"{ode.shape[ode_kind == shape].mean():.3f} |")
    emit_markdown(md, args.out)


if __name__ == "__main__":
    main()
