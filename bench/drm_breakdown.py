"""Benchmark tool: where a toy-world DRM ranks held-out pairs right, by oracle gap and by what decides the pair.

    python bench/drm_breakdown.py --drm outputs/r6/drm/soft0.1-pretrained-s0/drm \
        --pairs outputs/r6/pairs/heldout.parquet --cache outputs/r6/cache/heldout --config toy model.path=...

Reads the held-out preference file (the images the oracle regrades here) and its embedding cache (the latents the DRM
scores, in the same row order, noised exactly as jobs/eval_drm.py noises them), and prints the DRM's accuracy at each
t split by (a) the oracle gap between winner and loser and (b) what decides the pair: the yes/no `correct` differs,
or both are equally correct and the faithfulness part (0.75 x colour x (0.4 + 0.3 shape + 0.3 placement)) or the
cleanliness part (0.25 x palette crispness) contributes more of the gap; and (c) whether one image of the pair shows
an extra object its caption does not mention (oracle.has_extra_object). A benchmark, not a test.
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
    args = parser.parse_intermixed_args(argv)
    job_config(args)
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
    edges = [0.0, 0.1, 0.2, 0.4, 1.0]
    print(f"{len(gap)} held-out pairs; oracle gap quartiles "
          f"{', '.join(f'{q:.3f}' for q in np.quantile(np.abs(gap), [0.25, 0.5, 0.75]))}; "
          f"{(gap <= 0).sum()} pairs regrade with the loser ahead (PNG quantization)\n")
    for t in (int(x) for x in args.timesteps.split(",")):
        r_w, r_l, _ = score_pairs_at(drm, args.cache, t)
        right = (r_w > r_l).numpy()
        if len(right) != len(gap):
            raise SystemExit(f"error: cache has {len(right)} pairs, the file {len(gap)}")
        print(f"t={t}: accuracy {right.mean():.3f}\n\n| split | pairs | share | accuracy |\n|---|---|---|---|")
        for lo_e, hi_e in zip(edges[:-1], edges[1:]):
            m = (np.abs(gap) > lo_e) & (np.abs(gap) <= hi_e)
            print(f"| oracle gap {lo_e:g} - {hi_e:g} | {m.sum()} | "
                  f"{m.mean():.2f} | {right[m].mean() if m.any() else float('nan'):.3f} |")
        for k in ("correct differs", "faithfulness decides", "cleanliness decides"):
            m = kinds == k
            print(f"| {k} | {m.sum()} | {m.mean():.2f} | {right[m].mean() if m.any() else float('nan'):.3f} |")
        for k, m in extra.items():
            print(f"| {k} | {m.sum()} | {m.mean():.2f} | {right[m].mean() if m.any() else float('nan'):.3f} |")
        print()


if __name__ == "__main__":
    main()
