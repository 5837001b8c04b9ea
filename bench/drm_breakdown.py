"""Benchmark tool: where a toy-world DRM ranks held-out pairs right, by oracle gap and by what decides the pair.

    python bench/drm_breakdown.py --drm outputs/r6/drm/soft0.1-pretrained-s0/drm \
        --pairs outputs/r6/pairs/heldout.parquet --cache outputs/r6/cache/heldout --config toy model.path=...

Reads the held-out preference file (the images the oracle regrades here) and its embedding cache (the latents the DRM
scores, in the same row order, noised exactly as jobs/eval_drm.py noises them), and prints the DRM's accuracy at each
t split by (a) the oracle gap between winner and loser and (b) what decides the pair: the yes/no `correct` differs,
or both are equally correct and the faithfulness part (0.75 x colour x (0.4 + 0.3 shape + 0.3 placement)) or the
cleanliness part (0.25 x palette crispness) contributes more of the gap; and (c) whether one image of the pair shows
an extra object its caption does not mention (oracle.has_extra_object). A benchmark, not a test.

With `--x0-reference` it also ranks the same pairs at the same noisy latents (the same noise draws) by the oracle's
grade of the policy's denoised estimate x0_hat = x_s - s * v (model.path's transformer, one forward with CFG per
image): the reference a reward model of noisy latents competes with, and what Step-GRPO's oracle on x0_hat sees. At
high noise it says how much of the winner / loser difference is still recoverable from x_s by this policy, so a
DRM's accuracy can be read against it rather than only against chance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    from drm_ray.console import add_config_args, job_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.set_defaults(config="toy")
    parser.add_argument("--drm", required=True)
    parser.add_argument("--pairs", required=True, help="the held-out preference Parquet")
    parser.add_argument("--cache", required=True, help="its embedding cache (jobs/preprocess.py)")
    parser.add_argument("--timesteps", default="0,750")
    parser.add_argument("--x0-reference", action="store_true",
                        help="also rank the pairs by the oracle of model.path's x0_hat at the same noisy latents")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    import numpy as np
    import torch

    from drm_ray.data.preferences import PreferenceReader
    from drm_ray.reward.evaluate import score_pairs_at
    from drm_ray.reward.model import DiffusionRewardModel
    from drm_ray.toy.oracle import has_extra_object, oracle_scores, score_terms
    from drm_ray.toy.world import RESOLUTION

    torch.set_num_threads(2)
    win, lose, prompts = [], [], []
    for b in PreferenceReader(args.pairs).iter_batches(512, RESOLUTION):
        win.append(b.image_win)
        lose.append(b.image_lose)
        prompts += b.prompt
    w = oracle_scores(torch.cat(win), prompts)
    lo = oracle_scores(torch.cat(lose), prompts)
    extra_w, extra_l = has_extra_object(torch.cat(win), prompts), has_extra_object(torch.cat(lose), prompts)
    extra = {"only the loser has an extra object": extra_l & ~extra_w,
             "only the winner has an extra object": extra_w & ~extra_l, "both or neither": extra_w == extra_l}
    gap = w.score - lo.score
    tw, tl = score_terms(w), score_terms(lo)
    d_clean = tw["cleanliness"] - tl["cleanliness"]
    d_faith = sum(tw[k] - tl[k] for k in ("colour", "shape", "placement"))
    kinds = np.where(w.correct != lo.correct, "correct differs",
                     np.where(np.abs(d_faith) >= np.abs(d_clean), "faithfulness decides", "cleanliness decides"))
    drm = DiffusionRewardModel.from_pretrained(args.drm)
    x0_oracle = X0Oracle(cfg) if args.x0_reference else None
    edges = [0.0, 0.1, 0.2, 0.4, 1.0]
    print(f"{len(gap)} held-out pairs; oracle gap quartiles "
          f"{', '.join(f'{q:.3f}' for q in np.quantile(np.abs(gap), [0.25, 0.5, 0.75]))}; "
          f"{(gap <= 0).sum()} pairs regrade with the loser ahead (PNG quantization)\n")
    for t in (int(x) for x in args.timesteps.split(",")):
        r_w, r_l, _ = score_pairs_at(drm, args.cache, t)
        right = (r_w > r_l).numpy()
        if len(right) != len(gap):
            raise SystemExit(f"error: cache has {len(right)} pairs, the file {len(gap)}")
        cols = {"accuracy": right}
        if x0_oracle is not None:  # the same pairs, noise draws and order, graded through the policy's x0_hat
            o_w, o_l, _ = score_pairs_at(x0_oracle, args.cache, t)
            cols["oracle via x0_hat"] = (o_w > o_l).numpy()
        print(f"t={t}: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in cols.items()) + "\n\n| split | pairs | share | "
              + " | ".join(cols) + " |\n|---|---|---|" + "---|" * len(cols))
        splits = [(f"oracle gap {lo_e:g} - {hi_e:g}", (np.abs(gap) > lo_e) & (np.abs(gap) <= hi_e))
                  for lo_e, hi_e in zip(edges[:-1], edges[1:])]
        splits += [(k, kinds == k) for k in ("correct differs", "faithfulness decides", "cleanliness decides")]
        splits += list(extra.items())
        for name, m in splits:
            print(f"| {name} | {m.sum()} | {m.mean():.2f} | "
                  + " | ".join(f"{v[m].mean() if m.any() else float('nan'):.3f}" for v in cols.values()) + " |")
        print()


class X0Oracle:
    """A stand-in for the DRM in `score_pairs_at`: scores noisy latents x_s [B, C, h, w] at s [B] by the oracle's
    grade of the policy's x0_hat (decoded by the toy codec). The caption of each row is recovered from its pooled
    prompt embedding, which must be one of the toy captions' (the cache was encoded by this text stack)."""

    def __init__(self, cfg):
        import torch

        from drm_ray.models.sd3 import build_components, model_kwargs
        from drm_ray.toy.pretrain import caption_table

        self.comps = build_components("toy", device="cpu", **model_kwargs(cfg.model, cfg.sampling))
        self.max_sequence_length = cfg.model.max_sequence_length
        self.texts, embeds, pooled = caption_table(self.comps, self.max_sequence_length)
        self.pooled, self.neg = pooled[:-1].float(), (embeds[-1:], pooled[-1:])
        self.guidance = cfg.sampling.guidance_scale
        self.device = torch.device("cpu")

    def __call__(self, x, s, embeds, pooled):
        import torch

        from drm_ray.diffusion.sampling import decode_latents, denoised_estimate
        from drm_ray.toy.oracle import oracle_scores

        dist, idx = torch.cdist(pooled.float(), self.pooled).min(1)
        if dist.max() > 1e-3 * self.pooled.norm(dim=1).mean():
            raise SystemExit("error: the cache's prompt embeddings are not this model's captions' (encode the cache "
                             "with the same model.path, or drop --x0-reference)")
        n = len(x)
        x0 = denoised_estimate(self.comps.transformer, x, s, embeds, pooled, self.neg[0].expand(n, -1, -1),
                               self.neg[1].expand(n, -1), self.guidance)
        images = decode_latents(self.comps.vae, x0)
        return torch.from_numpy(oracle_scores(images, [self.texts[i] for i in idx.tolist()]).score)


if __name__ == "__main__":
    main()
