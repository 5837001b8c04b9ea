"""Sample images from an SD3 model: plain SDE/ODE sampling, or DRM-guided Step-wise Sampling with --k > 1.

    python jobs/sample.py                                   # tiny preset, built-in prompts, k = 1, CPU, seconds
    python jobs/sample.py --k 4 --drm outputs/tiny/drm      # Step-wise Sampling with a DRM from jobs/train_drm.py
    python jobs/sample.py --k 4 --drm outputs/tiny/drm --seeds-per-prompt 4 --ray --workers 2
    ray job submit --working-dir . -- python jobs/sample.py --config sd35m model.path=/models/sd3.5-medium \\
        --prompts prompts.txt --k 6 --drm /ckpt/drm --ray --workers 4 --scorers 1

With k = 1 every step but the last is an SDE step (sampling.noise_level; 0 gives ODE sampling) and no DRM is
needed. With k > 1 each such step draws k children from one shared mean, the rewards of `reward.rewards` (default:
the DRM of --drm, a directory written by jobs/train_drm.py to `<run.output_dir>/drm`, scoring each child at its
noise level; image rewards score each child's denoised estimate x0_hat, one extra policy forward per child) rate
them and the best continues; the last step is deterministic. Several rewards select by the weighted mean of their
scores standardized over the k children (as the RL job combines them), so no reward wins by its scale alone.
`sampling.k` is Step-GRPO's group size and is not read here: --k decides. `reward.judges` (e.g. [clip] with
reward.clip_path) score every final image and are reported beside the selecting reward, never used to select.

--ray runs sampler actors and reward scorer actors (rollout.num_gpus / rollout.num_cpus each; --workers, --scorers),
joining the cluster in RAY_ADDRESS or starting a local Ray. Seeds are per image: `run.seed + replica * P + prompt
index` (P prompts; replica 0 is `run.seed + prompt index`), one generator for the initial noise and every SDE draw,
so images do not depend on batching or on the number of workers.

Writes into --out (default `<run.output_dir>/samples`): PNGs `<prompt>_<replica>.png` and `metadata.parquet`
(prompt, seed, k, file, step_scores = the selected child's score per branching step (with several rewards their
weighted sum, though they select by each standardized over the k children), score_spread, final_score = the selecting
reward of the final image at s = 0, judge_<name> per judge, diversity_group = prompt index, ...). With
--seeds-per-prompt S >= 2 it reports the diversity across seeds (drm_ray.diversity: mean pairwise RMS pixel distance
and 1 - SSIM). An MLflow run (sqlite `<run.output_dir>/mlflow.db` unless tracking.tracking_uri
says otherwise) gets the parameters, an image grid and the scores, judges (sample/judge/<name>), per step the rank
correlation of the selected child's score with the final score and each judge, diversity and timings as metrics.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from drm_ray.console import add_config_args, fail, job_config, run_job  # noqa: E402
from drm_ray.data.prompts import load_prompts  # noqa: E402
from drm_ray.runtime import job_env  # noqa: E402

# torch, diffusers, Ray and MLflow are imported after the arguments are checked, so a bad call fails in a second.

GRID_MAX_IMAGES = 64

SCHEMA = pa.schema([
    ("prompt", pa.string()), ("seed", pa.int64()), ("k", pa.int64()), ("file", pa.string()),
    ("step_scores", pa.list_(pa.float64())), ("score_spread", pa.list_(pa.float64())),
    ("chosen", pa.list_(pa.int64())), ("final_score", pa.float64()), ("diversity_group", pa.int64()),
    ("replica", pa.int64()), ("num_steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("noise_level", pa.float64()),
])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--prompts", default=None, help="a .txt or .parquet prompt file (default: built-in set)")
    parser.add_argument("--out", default=None, help="output directory (default: <run.output_dir>/samples)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per denoising batch")
    parser.add_argument("--k", type=int, default=1, help="candidates per step; k > 1 needs --drm (default 1)")
    parser.add_argument("--drm", default=None, help="a DRM directory (jobs/train_drm.py writes <run.output_dir>/drm)")
    parser.add_argument("--seeds-per-prompt", type=int, default=1, help="images per prompt; >= 2 reports diversity")
    parser.add_argument("--ray", action="store_true", help="sample on Ray actors (sampler and DRM scorer actors)")
    parser.add_argument("--workers", type=int, default=None, help="sampler actors (default rollout.num_workers)")
    parser.add_argument("--scorers", type=int, default=None, help="DRM scorer actors (default rollout.num_scorers)")
    args = parser.parse_intermixed_args(argv)  # overrides may sit between options
    for name in ("k", "batch_size", "seeds_per_prompt", "workers", "scorers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.drm:
        from drm_ray.reward.model import CONFIG_NAME, WEIGHTS_NAME

        if not ((Path(args.drm) / CONFIG_NAME).is_file() and (Path(args.drm) / WEIGHTS_NAME).is_file()):
            parser.error(f"--drm {args.drm} is not a DRM directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = job_config(args)
    drm_path = args.drm or cfg.reward.drm_path
    from drm_ray.reward.specs import parse_spec

    bare_drm = any(r.kind == "drm" and r.source is None for r in map(parse_spec, cfg.reward.rewards))
    if args.k > 1 and bare_drm and not drm_path:
        fail(f"--k {args.k} needs --drm DIR (a DRM directory from jobs/train_drm.py): the DRM picks the best of the "
             "k candidates at each step (or select with other reward.rewards)")
    prompts = load_prompts(args.prompts, cfg.model.preset)
    job_env(cfg.model.preset, cfg.model.path)  # sd35m: fails here, once, if model.path cannot provide weights
    import torch

    from drm_ray.models.sd3 import model_kwargs
    from drm_ray.sample_driver import plan_items
    from drm_ray.tracking import Tracker
    from drm_ray.workers.scorer import scorer_kwargs

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    s, ro = cfg.sampling, cfg.rollout
    if args.k > 1 and s.noise_level == 0:
        print(f"[sample] note: sampling.noise_level=0 makes all {args.k} candidates identical (ODE steps); the DRM "
              "has nothing to choose from", flush=True)
    workers, scorers = args.workers or ro.num_workers, args.scorers or ro.num_scorers
    items = plan_items(prompts, args.seeds_per_prompt, cfg.run.seed)
    out = Path(args.out or Path(cfg.run.output_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    sampler_kwargs = dict(preset=cfg.model.preset, model_kwargs=model_kwargs(cfg.model, s), num_steps=s.num_steps,
                          k=args.k, noise_level=s.noise_level, guidance_scale=s.guidance_scale)
    # the rewards that select (and score the final images): needed for k > 1; with k = 1 only when a DRM is given
    selecting = args.k > 1 or bool(args.drm)
    rewards = dict(scorer_kwargs(cfg, cfg.reward.rewards, drm_path, cfg.model.dtype)) if selecting else None
    judges = dict(scorer_kwargs(cfg, cfg.reward.judges, drm_path, cfg.model.dtype)) if cfg.reward.judges else None

    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run.output_dir,
                      run_name=cfg.tracking.run_name or f"sample-k{args.k}", tags={"job": "sample"})
    tracker.log_params({**cfg.flat(), "sample.k": args.k, "sample.drm": drm_path, "sample.prompts": args.prompts,
                        "sample.seeds_per_prompt": args.seeds_per_prompt, "sample.batch_size": args.batch_size,
                        "sample.ray": args.ray, "sample.workers": workers if args.ray else 1,
                        "sample.scorers": scorers if args.ray and rewards else 0})
    try:
        batches, timing = run_sampling(args, cfg, prompts, sampler_kwargs, rewards, judges, items, workers, scorers,
                                       threads)
        timing["x0_forwards"] = sum(b.x0_forwards for b in batches)
        rows, images = write_outputs(out, items, batches, args.k, s)
        report(tracker, out, rows, images, items, args, timing)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return out


def run_sampling(args, cfg, prompts, sampler_kwargs, rewards, judges, items, workers, scorers, threads):
    """All batches, in plan order, and {startup_s, sampling_s}. `rewards` / `judges`: RewardScorer keyword
    arguments (None: no such scorer)."""
    from drm_ray.sample_driver import init_ray, sample_local, sample_on_ray, start_actors, stop_actors
    from drm_ray.workers.sampler import StepwiseSampler
    from drm_ray.workers.scorer import RewardScorer

    ro, s = cfg.rollout, cfg.sampling
    start = time.perf_counter()
    if not args.ray:
        from drm_ray.data.prompt_table import encode_prompt_table

        table = encode_prompt_table(prompts, s.negative_prompt, cfg.model.preset, sampler_kwargs["model_kwargs"])
        scorer = RewardScorer(prompts=table, torch_threads=threads, **rewards) if rewards else None
        judge = RewardScorer(prompts=table, torch_threads=threads, **judges) if judges else None
        sampler = StepwiseSampler(**sampler_kwargs, prompts=table, scorer=scorer, judges=judge, torch_threads=threads)
        ready = time.perf_counter()
        batches = sample_local(sampler, items, args.batch_size)
        return batches, dict(startup_s=ready - start, sampling_s=time.perf_counter() - ready)
    print(f"[sample] {init_ray()}", flush=True)
    from drm_ray.data.prompt_table import prompt_table_ref
    from drm_ray.placement import RoleDemand, ensure_resources

    bundle = {k: v for k, v in {"CPU": ro.num_cpus, "GPU": ro.num_gpus}.items() if v}
    ensure_resources([RoleDemand("sampler actors", workers, bundle),
                      RoleDemand("reward scorers", scorers if rewards else 0, bundle),
                      RoleDemand("judge scorer", 1 if judges else 0, bundle)], ro.autoscale_wait_s)
    table = prompt_table_ref(prompts, s.negative_prompt, cfg.model.preset, sampler_kwargs["model_kwargs"],
                             on_gpu=bool(ro.num_gpus))
    samplers, others = start_actors(sampler_kwargs, table, rewards, judges, num_workers=workers,
                                    num_scorers=scorers, num_cpus=ro.num_cpus, num_gpus=ro.num_gpus,
                                    timeout_s=ro.timeout_s, torch_threads=threads)
    try:
        ready = time.perf_counter()
        batches = sample_on_ray(samplers, items, args.batch_size, ro.timeout_s)
    finally:
        stop_actors(samplers + others)
    return batches, dict(startup_s=ready - start, sampling_s=time.perf_counter() - ready)


def write_outputs(out: Path, items, batches, k: int, s) -> tuple[list[dict], np.ndarray]:
    """PNGs and metadata.parquet; returns the rows and all images [N, H, W, 3] uint8 in plan order."""
    rows, images = [], []
    for batch in batches:
        for j, i in enumerate(batch.index):
            item = items[i]
            name = f"{item.prompt_index:05d}_{item.replica:03d}.png"
            Image.fromarray(batch.images[j]).save(out / name)
            images.append(batch.images[j])
            scored = k > 1  # with k = 1 nothing is scored during the steps
            rows.append(dict(
                prompt=item.prompt, seed=item.seed, k=k, file=name,
                step_scores=batch.step_scores[j].tolist() if scored else None,
                score_spread=batch.spread[j].tolist() if scored else None,
                chosen=batch.chosen[j].tolist() if scored else None,
                final_score=None if batch.final_score is None else float(batch.final_score[j]),
                diversity_group=item.prompt_index, replica=item.replica, num_steps=s.num_steps,
                guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                **{f"judge_{name}": float(v[j]) for name, v in (batch.judges or {}).items()}))
    judges = sorted(k for k in rows[0] if k.startswith("judge_")) if rows else []
    schema = SCHEMA
    for name in judges:
        schema = schema.append(pa.field(name, pa.float64()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "metadata.parquet")
    return rows, np.stack(images)


def report(tracker, out: Path, rows, images: np.ndarray, items, args, timing: dict) -> None:
    """Metrics and the image grid to MLflow, and a summary line."""
    import torch

    from drm_ray.diversity import prompt_diversity

    n = len(rows)
    x0_forwards = timing.pop("x0_forwards", 0)  # policy forwards for the x0_hat of image rewards
    metrics = {f"timing/{key}": value for key, value in timing.items()}
    metrics["timing/s_per_image"] = timing["sampling_s"] / n
    finals = [r["final_score"] for r in rows if r["final_score"] is not None]
    if finals:
        metrics["sample/final_score_mean"] = float(np.mean(finals))
    for key in sorted(k for k in rows[0] if k.startswith("judge_")):  # judges: never used to select
        metrics[f"sample/judge/{key.removeprefix('judge_')}"] = float(np.mean([r[key] for r in rows]))
    metrics["compute/x0_forwards"] = float(x0_forwards)
    if args.seeds_per_prompt >= 2:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W]
        metrics.update(prompt_diversity(pixels, [it.prompt_index for it in items]))
    tracker.log_metrics(metrics, step=0)
    if args.k > 1:
        from drm_ray.algorithms.ranking import spearman

        per_step = np.array([r["step_scores"] for r in rows])  # [N, steps - 1]
        spread = np.array([r["score_spread"] for r in rows])
        final = np.array([r["final_score"] for r in rows], dtype=np.float64)
        judges = {k.removeprefix("judge_"): np.array([r[k] for r in rows]) for k in rows[0] if k.startswith("judge_")}
        for i in range(per_step.shape[1]):
            # how well the selected child's score at this step predicts the final image's reward and each judge
            step = {"sample/selected_score": per_step[:, i].mean(), "sample/score_spread": spread[:, i].mean(),
                    "sample/step_final_spearman": spearman(per_step[:, i], final)}
            step.update({f"sample/step_judge_spearman/{name}": spearman(per_step[:, i], v)
                         for name, v in judges.items()})
            tracker.log_metrics(step, step=i)
    cols = args.seeds_per_prompt if args.seeds_per_prompt > 1 else min(8, n)
    tracker.log_image(image_grid(images[:GRID_MAX_IMAGES], cols), "samples_grid.png")
    shown = {key: round(value, 4) for key, value in metrics.items()}
    print(f"[sample] wrote {n} images (k={args.k}) to {out}; {shown}; MLflow run {tracker.run_id} at {tracker.uri}",
          flush=True)


def image_grid(images: np.ndarray, cols: int) -> Image.Image:
    """Images [N, H, W, 3] uint8 -> one RGB image, `cols` per row, row-major."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(grid)


if __name__ == "__main__":
    run_job(main)
