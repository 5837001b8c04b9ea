"""Evaluate a DRM: preference accuracy on held-out pairs at t = 0 and at several noise levels, tie-aware where the
data has ties; prints a table and logs it, with a plot of accuracy against t, to MLflow.

    python jobs/eval_drm.py                                  # tiny: <run.output_dir>/drm on a synthetic held-out set
    python jobs/eval_drm.py --drm outputs/tiny/drm --pairs heldout.parquet --timesteps 0 250 500 750 950
    python jobs/eval_drm.py --config sd35m model.path=/models/sd3.5-medium --drm /ckpt/drm --cache /data/test_cache

The synthetic held-out set of the tiny preset uses a different seed from training and includes 10% ties.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drm_ray.console import add_config_args, job_config, run_job  # noqa: E402
from drm_ray.runtime import init_ray, job_env  # noqa: E402


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--drm", help="DRM directory (default: reward.drm_path, else <run.output_dir>/drm)")
    parser.add_argument("--pairs", help="held-out preference Parquet")
    parser.add_argument("--cache", help="held-out embedding cache")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 250, 500, 750, 950])
    parser.add_argument("--eval-pairs", type=int, default=512, help="size of the synthetic held-out set")
    parser.add_argument("--json", help="also write the rows (t, accuracy, pairs, ties, ..., and each non-tie pair's "
                        "margin r_w - r_l, for paired comparisons of DRMs) to this JSON file")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    job_env(cfg.model.preset, cfg.model.path)
    bad = [t for t in args.timesteps if not 0 <= t <= 1000]
    if bad:
        parser.error(f"--timesteps must lie in [0, 1000], got {bad}")

    from drm_ray.data.preprocess import cache_dir_for, encoder_options, ensure_synthetic_cache, preprocess_pairs
    from drm_ray.models.sd3 import default_device, latent_size, model_kwargs
    from drm_ray.reward.evaluate import accuracy_plot, evaluate_drm, format_table
    from drm_ray.reward.model import DiffusionRewardModel
    from drm_ray.tracking import Tracker

    out = Path(cfg.run.output_dir).resolve()
    drm_dir = Path(args.drm or cfg.reward.drm_path or out / "drm")
    drm = DiffusionRewardModel.from_pretrained(drm_dir, device=default_device())
    kwargs = model_kwargs(cfg.model, cfg.sampling)
    drm.check_compatible(drm.transformer_config, latent_size(cfg.model.preset, cfg.sampling.resolution))
    cache = args.cache
    if cache is None:
        init_ray()
        if args.pairs:
            cache = cache_dir_for(args.pairs, out / "cache", cfg.model.preset, kwargs, cfg.data.latent_dtype)
            if not (cache / "meta.json").is_file():
                preprocess_pairs(args.pairs, cache, preset=cfg.model.preset, model_kwargs=kwargs,
                                 **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
        else:
            cache = ensure_synthetic_cache(out / "synthetic" / "eval_ties", n=args.eval_pairs,
                                           seed=cfg.run.seed + 2, tie_fraction=0.1, preset=cfg.model.preset,
                                           model_kwargs=kwargs,
                                           **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
    rows = evaluate_drm(drm, cache, timesteps=args.timesteps, seed=cfg.run.seed)
    table = format_table(rows)
    print(f"DRM {drm_dir} on {cache}\n{table}", flush=True)

    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, out,
                      run_name=cfg.tracking.run_name or "eval_drm", tags={"job": "eval_drm"})
    tracker.log_params({"drm": str(drm_dir), "cache": str(cache), "timesteps": args.timesteps})
    for r in rows:
        metrics = {"eval/accuracy": r.accuracy}
        if r.ties:
            metrics.update({"eval/tie_aware_accuracy": r.tie_aware_accuracy, "eval/tie_threshold": r.tie_threshold})
        tracker.log_metrics(metrics, step=r.t)  # step = t, so MLflow draws accuracy against t
    tracker.log_text(table, "accuracy_vs_t.txt")
    tracker.log_figure(accuracy_plot(rows), "accuracy_vs_t.png")
    tracker.end()
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    run_job(main)
