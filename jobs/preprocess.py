"""Encode a preference Parquet once into the embedding cache (VAE latents + SD3 text embeddings), with Ray Data.

    python jobs/preprocess.py --pairs pairs.parquet --out outputs/cache                      # tiny preset, local Ray
    python jobs/preprocess.py --pairs pairs.parquet --out outputs/cache --on-bad-image skip --overwrite
    ray job submit --working-dir . -- python jobs/preprocess.py --config sd35m model.path=/models/sd3.5-medium \
        --pairs /shared/pickapic.parquet --out /shared/cache-sd35m --concurrency 8 --num-gpus 1

`--pairs` is a preference Parquet (`drm_ray.data.preferences`; convert public sets with `drm_ray.data.convert`). It is
validated before any Ray work. Encoder actors (`--concurrency`, each with `--num-gpus`, default 1 when the preset's
rollout actors use GPUs, else 0) encode both images and the prompt; the cache is written under `--out` with
meta.json last, and appears only when complete. Winners get label 1.0, ties 0.5. On a cluster, `--pairs` and `--out`
must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from drm_ray.config import add_config_args, load_config  # noqa: E402
from drm_ray.data.preprocess import preprocess_pairs  # noqa: E402
from drm_ray.models.sd3 import model_kwargs  # noqa: E402
from drm_ray.runtime import job_env  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--pairs", required=True, help="preference Parquet (prompt, image_win, image_lose[, ...])")
    parser.add_argument("--out", required=True, help="cache directory to create")
    parser.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per encoder actor (default: rollout.num_gpus of the preset, 1 on sd35m)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per encoder call")
    parser.add_argument("--shard-rows", type=int, default=256, help="pairs per cache shard")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="a row whose image does not decode: fail (default) or skip it and count it")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete cache at --out")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job_env(cfg.model.preset, cfg.model.path)  # sd35m: fails here, once, if model.path cannot provide weights

    start = time.perf_counter()
    num_gpus = cfg.rollout.num_gpus if args.num_gpus is None else args.num_gpus
    stats = preprocess_pairs(args.pairs, args.out, preset=cfg.model.preset,
                             model_kwargs=model_kwargs(cfg.model, cfg.sampling), concurrency=args.concurrency,
                             num_gpus=num_gpus, batch_size=args.batch_size, shard_rows=args.shard_rows,
                             on_bad_image=args.on_bad_image, overwrite=args.overwrite)
    print(f"wrote {stats.rows_written} pairs ({stats.ties} ties, {len(stats.skipped_rows)} skipped) of "
          f"{stats.rows_in} to {args.out} in {time.perf_counter() - start:.1f}s")
    return Path(args.out)


if __name__ == "__main__":
    main()
