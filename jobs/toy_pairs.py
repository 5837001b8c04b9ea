"""Oracle-labelled preference pairs from the pre-trained toy model's own samples, for jobs/train_drm.py.

    python jobs/toy_pairs.py                                   # outputs/toy/pairs/{train,val,heldout}.parquet
    python jobs/train_drm.py --config toy --pairs outputs/toy/pairs/train.parquet \
        data.heldout_data=<cache of val.parquet> drm.val_every=100      # keeps the best step by validation
    python jobs/eval_drm.py --config toy --pairs outputs/toy/pairs/heldout.parquet

Every caption is sampled `--samples` times (ODE + CFG, the model at model.path), the hidden oracle grades each image,
and random same-caption pairs whose grades differ by more than `--margin` become (winner, loser) rows in the
preference Parquet format. The validation set (early stopping: `drm.val_every` keeps the best step) and the held-out
set (the accuracy a report quotes) use other seeds each, so the step is never chosen on the pairs that measure it.
Statistics go to `<out>/pairs_meta.json`. `--soft TAU` gives the training pairs soft labels, P(winner preferred) =
sigmoid(oracle gap / TAU); `--soften FILE --soft TAU` relabels an existing preference file that way (no sampling)
and writes FILE with `.soft<TAU>` before its suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drm_ray.console import add_config_args, job_config, run_job  # noqa: E402
from drm_ray.runtime import job_env  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.set_defaults(config="toy")
    parser.add_argument("--out", help="output directory (default <run.output_dir>/pairs)")
    parser.add_argument("--samples", type=int, default=32, help="images per caption (train set)")
    parser.add_argument("--pairs", type=int, default=200,
                        help="candidate pairs per caption (train set); about a quarter pass --margin")
    parser.add_argument("--heldout-samples", type=int, default=16)
    parser.add_argument("--heldout-pairs", type=int, default=64)
    parser.add_argument("--val-samples", type=int, default=8, help="images per caption of the validation set "
                        "(0: none)")
    parser.add_argument("--val-pairs", type=int, default=32)
    parser.add_argument("--margin", type=float, default=0.05, help="minimum oracle difference of a pair")
    parser.add_argument("--mix", action="store_true",
                        help="train set spanning the quality range RL visits: samples at several guidance scales "
                             "and noise levels, dataset renders, other captions' renders (held-out set unchanged)")
    parser.add_argument("--soft", type=float, default=None, metavar="TAU",
                        help="soft labels for the training pairs: sigmoid(oracle gap / TAU)")
    parser.add_argument("--soften", default=None, metavar="FILE",
                        help="relabel this preference file with --soft TAU instead of sampling")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    if cfg.model.preset != "toy":
        parser.error(f"toy_pairs needs the toy preset; --config {args.config} has model.preset={cfg.model.preset}")
    if min(args.samples, args.heldout_samples) < 2 or min(args.pairs, args.heldout_pairs) < 1:
        parser.error("--samples / --heldout-samples must be >= 2 and --pairs / --heldout-pairs >= 1")
    if args.val_samples and (args.val_samples < 2 or args.val_pairs < 1):
        parser.error("--val-samples must be 0 or >= 2, and --val-pairs >= 1")
    if args.soft is not None and not args.soft > 0:
        parser.error(f"--soft must be > 0, got {args.soft}")
    if args.soften and args.soft is None:
        parser.error("--soften needs --soft TAU")
    job_env(cfg.model.preset)
    import torch

    if args.soften:
        from drm_ray.toy.pairs import soften_pairs

        src = Path(args.soften)
        dst = src.with_name(f"{src.stem}.soft{args.soft:g}{src.suffix}")
        stats = soften_pairs(src, dst, args.soft)
        print(f"[toy_pairs] {stats['pairs']} pairs relabelled (tau {args.soft:g}, label mean {stats['label_mean']:.3f}, "
              f"quartiles {', '.join(f'{q:.3f}' for q in stats['label_quartiles'])}; {stats['flipped']} swapped, "
              f"{stats['dropped_equal']} dropped) -> {dst}", flush=True)
        return stats

    torch.set_num_threads(args.threads)
    from drm_ray.models.sd3 import build_components, model_kwargs
    from drm_ray.toy.pairs import write_oracle_pairs

    out = Path(args.out or Path(cfg.run.output_dir) / "pairs").resolve()
    comps = build_components("toy", device="cpu", **model_kwargs(cfg.model, cfg.sampling))
    common = dict(num_steps=cfg.sampling.eval_num_steps, guidance_scale=cfg.sampling.guidance_scale,
                  max_sequence_length=cfg.model.max_sequence_length, margin=args.margin)
    meta = {
        "train": write_oracle_pairs(out / "train.parquet", comps, samples_per_caption=args.samples,
                                    pairs_per_caption=args.pairs, seed=cfg.run.seed, mix=args.mix, soft=args.soft,
                                    **common),
        "heldout": write_oracle_pairs(out / "heldout.parquet", comps, samples_per_caption=args.heldout_samples,
                                      pairs_per_caption=args.heldout_pairs, seed=cfg.run.seed + 7_919, **common),
        "model_path": str(Path(cfg.model.path).resolve()),
    }
    if args.val_samples:
        meta["val"] = write_oracle_pairs(out / "val.parquet", comps, samples_per_caption=args.val_samples,
                                         pairs_per_caption=args.val_pairs, seed=cfg.run.seed + 15_485, **common)
    (out / "pairs_meta.json").write_text(json.dumps(meta, indent=2))
    for name in [n for n in ("train", "val", "heldout") if n in meta]:
        s = meta[name]
        print(f"[toy_pairs] {name}: {s['pairs']} pairs from {s['images']} images (oracle {s['oracle_mean']:.3f} "
              f"+- {s['oracle_std']:.3f}) -> {out / (name + '.parquet')}", flush=True)
    return meta


if __name__ == "__main__":
    run_job(main)
