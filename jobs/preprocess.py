"""Encode preference Parquet files once into the embedding cache (VAE latents + SD3 text embeddings), with Ray.

    python jobs/preprocess.py --pairs pairs.parquet --out outputs/cache                      # tiny preset, local Ray
    python jobs/preprocess.py --pairs pairs/ --out outputs/cache --on-bad-image skip --overwrite
    ray job submit --working-dir . -- python jobs/preprocess.py --config sd35m model.path=/models/sd3.5-medium \
        --pairs '/shared/pickapic/*.parquet' --out /shared/cache-sd35m --concurrency 8

`--pairs` is a preference Parquet, a directory of them or a glob (`drm_ray.data.preferences`; convert public sets with
`drm_ray.data.convert`); every file is validated before any Ray work. Encoder actors (data.encoder_workers, each with
data.encoder_gpus GPUs, data.encoder_batch_size pairs per call; the flags override them) text-encode each distinct
prompt once and VAE-encode both images of every pair, writing the cache files themselves (latents in
data.latent_dtype: bfloat16 on sd35m). The cache appears under `--out` only when complete (meta.json last). Winners
get label 1.0, ties 0.5. On a cluster, `--pairs` and `--out` must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from drm_ray.console import add_config_args, job_config, run_job  # noqa: E402
from drm_ray.runtime import job_env  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--pairs", required=True,
                        help="preference Parquet (prompt, image_win, image_lose[, ...]), a directory of them or a glob")
    parser.add_argument("--out", required=True, help="cache directory to create")
    parser.add_argument("--concurrency", type=int, default=None, help="encoder actors (data.encoder_workers)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per encoder actor (data.encoder_gpus)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per encoder call (data.encoder_batch_size)")
    parser.add_argument("--shard-rows", type=int, default=None, help="pairs per cache shard (data.shard_rows)")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="a row whose image does not decode: fail (default) or skip it and count it")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete cache at --out")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job_env(cfg.model.preset, cfg.model.path)  # sd35m: fails here, once, if model.path cannot provide weights
    # the model stack is imported after job_config has quieted the libraries (transformers warns at import)
    from drm_ray.data.preprocess import encoder_options, preprocess_pairs
    from drm_ray.models.sd3 import model_kwargs

    start = time.perf_counter()
    options = encoder_options(cfg.data, cfg.rollout.autoscale_wait_s)
    flags = dict(concurrency=args.concurrency, num_gpus=args.num_gpus, batch_size=args.batch_size,
                 shard_rows=args.shard_rows)
    options.update({k: v for k, v in flags.items() if v is not None})
    stats = preprocess_pairs(args.pairs, args.out, preset=cfg.model.preset,
                             model_kwargs=model_kwargs(cfg.model, cfg.sampling), on_bad_image=args.on_bad_image,
                             overwrite=args.overwrite, **options)
    seconds = time.perf_counter() - start
    print(f"wrote {stats.rows_written} pairs ({stats.ties} ties, {len(stats.skipped_rows)} skipped) of "
          f"{stats.rows_in} over {stats.prompts} distinct prompts to {args.out} in {seconds:.1f}s "
          f"({stats.rows_written / seconds:.1f} pairs/s; text encoders {stats.seconds['prompts']:.1f}s with the "
          f"actors' start, images {stats.seconds['pairs']:.1f}s)")
    return Path(args.out)


if __name__ == "__main__":
    run_job(main)
