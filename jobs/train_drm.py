"""Train a Diffusion-based Reward Model (DRM) with Bradley-Terry on noised preference pairs (Ray Train + DeepSpeed).

    python jobs/train_drm.py                          # tiny: synthetic pairs, CPU, local Ray, a few minutes
    python jobs/train_drm.py --pairs pairs.parquet    # your preference pairs (prompt, image_win, image_lose)
    python jobs/train_drm.py --cache cache/ drm.init=random   # a prebuilt embedding cache; the ablation
    ray job submit --working-dir . -- python jobs/train_drm.py --config sd35m model.path=/models/sd3.5-medium \\
        --pairs /data/pickapic.parquet data.heldout_data=/data/pickapic_val_cache drm.val_every=200 \\
        drm.num_workers=8 drm.use_gpu=true drm.micro_batch=4 drm.gradient_checkpointing=true

Writes `<run.output_dir>/drm_last` (the final DRM) and `<run.output_dir>/drm`, the directory later jobs take as
`reward.drm_path`: with validation on (`drm.val_every` > 0) the DRM of the step with the best mean held-out accuracy
over `drm.val_timesteps` (logged as val/accuracy_t{t}, val/accuracy_mean), otherwise the final one. Also Ray Train
checkpoints under `<run.output_dir>/ray_train/drm` and an MLflow run (sqlite `<run.output_dir>/mlflow.db` unless
tracking.tracking_uri or MLFLOW_TRACKING_URI says otherwise). Resubmitting with the same output directory resumes
from the latest checkpoint in the same MLflow run. The held-out set of validation is `data.heldout_data` (a cache,
or a preference Parquet that is encoded first), else --eval-cache, else (tiny, no --pairs / --cache) the built-in
synthetic held-out set. Without --pairs / --cache the tiny preset builds the built-in synthetic set (the winner
shows the colour its caption names) and a held-out set, and reports held-out accuracy at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drm_ray.console import add_config_args, job_config, run_job  # noqa: E402
from drm_ray.runtime import init_ray, job_env  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--pairs", help="preference Parquet (prompt, image_win, image_lose[, source, tie])")
    parser.add_argument("--cache", help="a prebuilt embedding cache (jobs/preprocess.py)")
    parser.add_argument("--eval-cache", help="held-out embedding cache, scored at t = 0 at the end")
    parser.add_argument("--synthetic-pairs", type=int, default=2048, help="size of the synthetic training set")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    if cfg.drm.val_every and (args.pairs or args.cache) and not (cfg.data.heldout_data or args.eval_cache):
        # before hours of preprocessing, not after (the synthetic set of the tiny preset brings its own held-out set)
        parser.error(f"drm.val_every = {cfg.drm.val_every} validates on held-out pairs: set data.heldout_data (a "
                     "preference Parquet, a directory of them or a cache) or --eval-cache, or drm.val_every=0")
    job_env(cfg.model.preset, cfg.model.path)

    from drm_ray.data.preprocess import cache_dir_for, encoder_options, ensure_synthetic_cache, preprocess_pairs
    from drm_ray.models.sd3 import model_kwargs
    from drm_ray.reward.trainer import train_drm
    from drm_ray.tracking import Tracker

    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    kwargs = model_kwargs(cfg.model, cfg.sampling)
    cache, eval_cache = args.cache, args.eval_cache
    if cache is None and args.pairs:
        cache = cache_dir_for(args.pairs, out / "cache", cfg.model.preset, kwargs, cfg.data.latent_dtype)
        if not (cache / "meta.json").is_file():
            preprocess_pairs(args.pairs, cache, preset=cfg.model.preset, model_kwargs=kwargs,
                             **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
    elif cache is None:
        print(f"[train_drm] no --pairs or --cache: building the synthetic preference set under {out}/synthetic",
              flush=True)
        cache = ensure_synthetic_cache(out / "synthetic" / "train", n=args.synthetic_pairs, seed=cfg.run.seed,
                                       preset=cfg.model.preset, model_kwargs=kwargs,
                                       **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
        if eval_cache is None:
            eval_cache = ensure_synthetic_cache(out / "synthetic" / "eval", n=256, seed=cfg.run.seed + 1,
                                                preset=cfg.model.preset, model_kwargs=kwargs,
                                                **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))

    heldout = cfg.data.heldout_data or eval_cache
    if cfg.drm.val_every and heldout is not None and not (Path(heldout) / "meta.json").is_file():  # pairs: encode
        heldout_cache = cache_dir_for(heldout, out / "cache", cfg.model.preset, kwargs, cfg.data.latent_dtype)
        if not (heldout_cache / "meta.json").is_file():
            preprocess_pairs(heldout, heldout_cache, preset=cfg.model.preset, model_kwargs=kwargs,
                             **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
        heldout = heldout_cache

    run_file = out / "train_drm_mlflow.json"  # the MLflow run a resubmitted job continues
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, out,
                      run_name=cfg.tracking.run_name or "train_drm", run_id=run_id, tags={"job": "train_drm"})
    if run_id is None:
        run_file.write_text(json.dumps({"run_id": tracker.run_id}))
        tracker.log_params({k: v for k, v in cfg.flat().items() if k.split(".")[0] in
                            ("model", "sampling", "drm", "data", "deepspeed", "run")})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
    start = time.perf_counter()
    drm_dir = train_drm(cfg, cache, tracker, heldout_dir=heldout)
    minutes = (time.perf_counter() - start) / 60
    tracker.log_metrics({"train/minutes": minutes}, cfg.drm.train_steps)
    if eval_cache is not None:
        from drm_ray.reward.evaluate import evaluate_drm
        from drm_ray.reward.model import DiffusionRewardModel

        from drm_ray.models.sd3 import default_device

        drm = DiffusionRewardModel.from_pretrained(drm_dir, device=default_device())
        row = evaluate_drm(drm, eval_cache, timesteps=(0,))[0]
        tracker.log_metrics({"eval/accuracy_t0": row.accuracy}, cfg.drm.train_steps)
        print(f"[train_drm] held-out accuracy at t=0: {row.accuracy:.3f} on {row.pairs} pairs", flush=True)
    tracker.log_artifacts(drm_dir, "drm")
    tracker.end()
    print(f"[train_drm] DRM written to {drm_dir} ({minutes:.1f} min); use it with reward.drm_path={drm_dir}",
          flush=True)
    return drm_dir


if __name__ == "__main__":
    run_job(main)
