"""Benchmark tool: where a toy-world DRM ranks held-out pairs right, by oracle gap and by what decides the pair.

    python bench/drm_breakdown.py --drm outputs/r6/drm/soft0.1-pretrained-s0/drm \
        --pairs outputs/r6/pairs/heldout.parquet --cache outputs/r6/cache/heldout --config toy model.path=...

Reads the held-out preference file (the images the oracle regrades here) and its embedding cache (the latents the DRM
scores, in the same row order, noised exactly as jobs/eval_drm.py noises them), and prints the DRM's accuracy at each
t split by (a) the oracle gap between winner and loser and (b) what decides the pair: the yes/no `correct` differs,
or both are equally correct and the faithfulness part (0.75 x colour x (0.4 + 0.3 shape + 0.3 placement)) or the
cleanliness part (0.25 x palette crispness) contributes more of the gap; and (c) whether one image of the pair shows
an extra object its caption does not mention (oracle.has_extra_object). A benchmark, not a test.

With `--reference` it also ranks the same pairs at the same noisy latents (the same noise draws) by the oracle's
grade of what model.path's policy makes of each noisy latent x_s (with CFG, as it samples):
  x0     its one-step denoised estimate x0_hat = x_s - s * v (what Step-GRPO's oracle on x0_hat sees; blurry at high s)
  ode    the ODE continuation from x_s to 0 along the rest of the sampling schedule (one crisp image)
  sdeK   the mean grade of K continuations with the rollouts' SDE (an estimate of E[oracle | x_s] under the policy)
References to read a DRM's accuracy against, rather than only against chance: at high noise they say how much of
the winner / loser difference this policy can still recover from x_s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

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
    parser.add_argument("--reference", default="", metavar="x0,ode,sdeK",
                        help="comma-separated: also rank the pairs by the oracle's grade of what model.path's "
                             "policy makes of the same noisy latents: x0 (one-step x0_hat), ode (ODE to 0), sdeK "
                             "(mean of K SDE continuations)")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
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
    refs = [PolicyOracle(cfg, name.strip()) for name in args.reference.split(",") if name.strip()]
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
        for ref in refs:  # the same pairs, noise draws and order, graded through the policy
            o_w, o_l, _ = score_pairs_at(ref, args.cache, t)
            cols[ref.label] = (o_w > o_l).numpy()
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


class PolicyOracle:
    """A stand-in for the DRM in `score_pairs_at`: scores noisy latents x_s [B, C, h, w] at one s [B] by the oracle's
    grade of what the policy makes of them (`kind`: x0, ode or sdeK; see the module docstring), decoded by the toy
    codec. The caption of each row is recovered from its pooled prompt embedding, which must be one of the toy
    captions' (the cache was encoded by this text stack)."""

    def __init__(self, cfg, kind: str = "x0", seed: int = 0):
        import torch

        from drm_ray.diffusion.flow import schedule_sigmas
        from drm_ray.models.sd3 import build_components, model_kwargs
        from drm_ray.toy.pretrain import caption_table

        if kind in ("x0", "ode"):
            self.repeats = 1
        elif kind.startswith("sde") and kind[3:].isdigit() and int(kind[3:]) > 0:
            self.repeats = int(kind[3:])
        else:
            raise SystemExit(f"error: --reference {kind!r}: expected x0, ode or sdeK with K >= 1 (e.g. sde4)")
        self.kind, self.seed = kind, seed
        self.label = {"x0": "oracle via x0_hat", "ode": "oracle via ODE to 0"}.get(
            kind, f"oracle via {self.repeats} SDE continuations")
        self.comps = build_components("toy", device="cpu", **model_kwargs(cfg.model, cfg.sampling))
        self.max_sequence_length = cfg.model.max_sequence_length
        self.texts, embeds, pooled = caption_table(self.comps, self.max_sequence_length)
        self.pooled, self.neg = pooled[:-1].float(), (embeds[-1:], pooled[-1:])
        self.guidance, self.noise_level = cfg.sampling.guidance_scale, cfg.sampling.noise_level
        self.sigmas = schedule_sigmas(self.comps.scheduler, cfg.sampling.num_steps)
        self.device = torch.device("cpu")
        self.calls = 0

    def __call__(self, x, s, embeds, pooled):
        import torch

        from drm_ray.diffusion.sampling import decode_latents, denoise, denoised_estimate
        from drm_ray.toy.oracle import oracle_scores

        dist, idx = torch.cdist(pooled.float(), self.pooled).min(1)
        if dist.max() > 1e-3 * self.pooled.norm(dim=1).mean():
            raise SystemExit("error: the cache's prompt embeddings are not this model's captions' (encode the cache "
                             "with the same model.path, or drop --reference)")
        n, captions = len(x), [self.texts[i] for i in idx.tolist()]
        neg_e, neg_p = self.neg[0].expand(n, -1, -1), self.neg[1].expand(n, -1)
        if self.kind == "x0":
            latents = [denoised_estimate(self.comps.transformer, x, s, embeds, pooled, neg_e, neg_p, self.guidance)]
        else:
            if not bool((s == s[0]).all()):
                raise ValueError("continuations need one noise level per call")
            sig = float(s[0])  # continue along the rest of the sampling schedule, starting at sig itself
            sigmas = torch.cat([torch.tensor([sig]), self.sigmas[self.sigmas < sig - 1e-6]])
            noise = 0.0 if self.kind == "ode" else self.noise_level
            self.calls += 1
            latents = [x.float() if len(sigmas) == 1 else
                       denoise(self.comps.transformer, sigmas, embeds, pooled, neg_e, neg_p, self.guidance, noise,
                               x, torch.Generator().manual_seed(self.seed * 100_003 + self.calls * 101 + r))
                       for r in range(self.repeats)]
        return torch.from_numpy(np.mean([oracle_scores(decode_latents(self.comps.vae, lat), captions).score
                                         for lat in latents], axis=0))


if __name__ == "__main__":
    main()
