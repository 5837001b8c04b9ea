"""Oracle-labelled preference pairs from the pre-trained toy model's own samples (the DRM's training data).

For every caption the model draws `samples_per_caption` images (ODE sampling with CFG from different seeds, the
distribution a policy starts RL from); the oracle grades each; pairs are drawn at random within a caption and kept
when the oracle scores differ by more than `margin` (closer pairs are label noise, and the DRM trainer drops ties).
The winner is the higher-scored image. Samples depend only on (seed, caption index, sample index), pairs only on
(seed, caption index), so a set is deterministic per seed.

`mix=True` widens the training images to the quality range a policy visits during RL, not only where it starts:
the model's samples at several guidance scales and SDE noise levels (`MIX_SETTINGS`), dataset renders of the
caption (near-perfect) and renders of other captions (wrong content, clean pixels). Pairs are still drawn within a
caption, across all of these. The held-out set stays the pre-trained policy's own ODE samples: that is where the
DRM's accuracy matters first.

`soft=tau` labels each pair with P(winner preferred) = sigmoid((oracle_w - oracle_l) / tau), a soft Bradley-Terry
target that tells the DRM how much better the winner is; `soften_pairs` relabels an existing file that way (the oracle
regrades its stored images), so a soft training set needs no new sampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drm_ray.data.preferences import image_to_bytes, write_preference_parquet
from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.diffusion.sampling import decode_latents, denoise, initial_latents, to_pil
from drm_ray.models.sd3 import encode_prompts, latent_size
from drm_ray.toy.oracle import oracle_scores
from drm_ray.toy.world import RESOLUTION, all_captions, caption_texts, parse_caption, render_scene

SOURCE = "toy_oracle"
MIX_SETTINGS = tuple((g, a) for g in (1.5, 4.5, 7.5) for a in (0.0, 0.7))  # (guidance scale, SDE noise level)


@torch.no_grad()
def sample_captions(comps, captions: list[str], samples_per_caption: int, seed: int, num_steps: int,
                    guidance_scale: float, max_sequence_length: int, noise_level: float = 0.0) -> torch.Tensor:
    """Images [len(captions), samples_per_caption, 3, H, W] in [0, 1] from the model in `comps`."""
    embeds, pooled = encode_prompts(comps, captions, max_sequence_length)     # [P, L, D], [P, P']
    neg, neg_pooled = encode_prompts(comps, [""], max_sequence_length)
    n = len(captions)
    sigmas = schedule_sigmas(comps.scheduler, num_steps)
    out = []
    for j in range(samples_per_caption):
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + p * 1_009 + j) for p in range(n)]
        x1 = initial_latents(n, comps.transformer.config.in_channels, latent_size("toy", RESOLUTION), gens)
        lat = denoise(comps.transformer, sigmas, embeds, pooled, neg.expand(n, -1, -1), neg_pooled.expand(n, -1),
                      guidance_scale, noise_level, x1, gens if noise_level > 0 else None)
        out.append(decode_latents(comps.vae, lat))
    return torch.stack(out, dim=1)


def renders(captions: list[str], per_caption: int, seed: int, mismatched: bool = False) -> torch.Tensor:
    """Dataset renders [P, per_caption, 3, H, W] of each caption, or (mismatched) of another caption drawn at
    random for each image: clean pixels with the wrong content."""
    rng = np.random.default_rng([seed, 1 if mismatched else 0])
    pool = all_captions()
    out = []
    for text in captions:
        cap = parse_caption(text)
        row = []
        for _ in range(per_caption):
            shown = cap
            while mismatched and shown == cap:
                shown = pool[int(rng.integers(len(pool)))]
            row.append(render_scene(shown, rng))
        out.append(np.stack(row))
    return torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3).float()


def mixed_images(comps, captions: list[str], samples_per_caption: int, seed: int, num_steps: int,
                 max_sequence_length: int, per_render: int = 2) -> tuple[torch.Tensor, list[str]]:
    """Images [P, S, 3, H, W] spanning the quality range (see the module doc) and the source of each column:
    `samples_per_caption` model samples split evenly over MIX_SETTINGS, `per_render` renders of the caption and
    `per_render` renders of other captions."""
    per = max(1, samples_per_caption // len(MIX_SETTINGS))
    parts, sources = [], []
    for c, (guidance, noise) in enumerate(MIX_SETTINGS):
        parts.append(sample_captions(comps, captions, per, seed * 31 + c, num_steps, guidance, max_sequence_length,
                                     noise))
        sources += [f"sample_g{guidance:g}_a{noise:g}"] * per
    parts += [renders(captions, per_render, seed), renders(captions, per_render, seed, mismatched=True)]
    sources += ["render"] * per_render + ["other_caption"] * per_render
    return torch.cat(parts, dim=1), sources


def soft_label(gap: float, tau: float) -> float:
    """P(winner preferred) for an oracle gap > 0 at temperature tau."""
    return float(1.0 / (1.0 + np.exp(-gap / tau)))


def oracle_pairs(images: torch.Tensor, captions: list[str], pairs_per_caption: int, margin: float,
                 seed: int, soft: float | None = None) -> tuple[list[dict], dict]:
    """Preference rows from images [P, S, 3, H, W] graded by the oracle, and statistics of the labelling.

    Per caption, `pairs_per_caption` distinct unordered pairs (all S(S-1)/2 when there are fewer) are drawn and kept
    when their grades differ by more than `margin`. The rows are returned in a random order (seeded), so any prefix
    (a trainer's validation reads the first `drm.val_pairs`) spans every caption.
    """
    p, s = images.shape[:2]
    scores = oracle_scores(images.flatten(0, 1), [c for c in captions for _ in range(s)]).score.reshape(p, s)
    first, second = np.triu_indices(s, k=1)  # every unordered pair once
    rows, considered = [], 0
    for ci, caption in enumerate(captions):
        rng = np.random.default_rng([seed, ci])
        drawn = rng.choice(len(first), size=min(pairs_per_caption, len(first)), replace=False)
        pil = None
        for a, b in zip(first[drawn], second[drawn]):
            considered += 1
            if abs(scores[ci, a] - scores[ci, b]) <= margin:
                continue
            win, lose = (a, b) if scores[ci, a] > scores[ci, b] else (b, a)
            pil = pil or to_pil(images[ci])
            gap = abs(float(scores[ci, a] - scores[ci, b]))
            rows.append({"prompt": caption, "image_win": image_to_bytes(pil[win]),
                         "image_lose": image_to_bytes(pil[lose]), "source": SOURCE, "tie": False,
                         "label": soft_label(gap, soft) if soft else None})
    order = np.random.default_rng([seed, len(captions)]).permutation(len(rows))
    rows = [rows[i] for i in order]
    stats = {"images": p * s, "oracle_mean": float(scores.mean()), "oracle_std": float(scores.std()),
             "pairs": len(rows), "pairs_considered": considered, "margin": margin}
    return rows, stats


def write_oracle_pairs(path: str | Path, comps, *, samples_per_caption: int, pairs_per_caption: int, seed: int,
                       num_steps: int, guidance_scale: float, max_sequence_length: int,
                       margin: float = 0.05, mix: bool = False, soft: float | None = None) -> dict:
    """Sample, grade, pair and write a preference Parquet at `path`; returns the labelling statistics."""
    captions = caption_texts()
    if mix:
        images, sources = mixed_images(comps, captions, samples_per_caption, seed, num_steps, max_sequence_length)
    else:
        images = sample_captions(comps, captions, samples_per_caption, seed, num_steps, guidance_scale,
                                 max_sequence_length)
        sources = [f"sample_g{guidance_scale:g}_a0"] * samples_per_caption
    rows, stats = oracle_pairs(images, captions, pairs_per_caption, margin, seed, soft)
    graded = oracle_scores(images.flatten(0, 1), [c for c in captions for _ in range(images.shape[1])]).score
    graded = graded.reshape(images.shape[0], images.shape[1])
    stats["sources"] = {name: float(graded[:, [j for j, s in enumerate(sources) if s == name]].mean())
                        for name in dict.fromkeys(sources)}  # mean oracle grade per source
    write_preference_parquet(path, rows)
    return stats


def soften_pairs(src: str | Path, dst: str | Path, tau: float, batch_size: int = 512) -> dict:
    """Relabel the preference file `src` with soft labels (module doc) into `dst`: the oracle regrades both stored
    images of each pair (as the DRM will see them, after PNG quantization). A pair whose regraded order flips is
    swapped, one whose grades are now equal (a label that is 0.5 in float32) is dropped; both are counted."""
    from drm_ray.data.preferences import PreferenceReader

    rows, flipped, dropped, labels = [], 0, 0, []
    reader = PreferenceReader(src)
    raw = reader.file.iter_batches(batch_size=batch_size, columns=["prompt", "image_win", "image_lose"])
    for batch, table in zip(reader.iter_batches(batch_size, RESOLUTION), raw):
        cols = table.to_pydict()
        if len(batch) != len(cols["prompt"]):
            raise ValueError(f"{src}: rows whose images do not decode; soften_pairs needs every row")
        s_w = oracle_scores(batch.image_win, batch.prompt).score
        s_l = oracle_scores(batch.image_lose, batch.prompt).score
        for i, prompt in enumerate(batch.prompt):
            gap = float(s_w[i] - s_l[i])
            if np.float32(soft_label(abs(gap), tau)) <= 0.5:  # equal grades (or a gap below float32's resolution)
                dropped += 1
                continue
            win, lose = ("image_win", "image_lose") if gap > 0 else ("image_lose", "image_win")
            flipped += gap < 0
            labels.append(soft_label(abs(gap), tau))
            rows.append({"prompt": prompt, "image_win": cols[win][i], "image_lose": cols[lose][i], "source": SOURCE,
                         "tie": False, "label": labels[-1]})
    write_preference_parquet(dst, rows)
    lab = np.array(labels)
    return {"pairs": len(rows), "flipped": int(flipped), "dropped_equal": dropped, "tau": tau,
            "label_mean": float(lab.mean()), "label_quartiles": [float(q) for q in np.quantile(lab, [0.25, 0.5, 0.75])]}
