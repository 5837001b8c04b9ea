"""Pre-train the toy preset's SD3-architecture transformer on the toy world's procedural scenes (CPU, ~10 minutes).

    python jobs/pretrain_toy.py                         # writes outputs/toy/pretrained (the toy preset's model.path)
    python jobs/pretrain_toy.py --steps 400 model.path=/tmp/toy_quick     # a quick, weaker checkpoint

Then every job takes `--config toy`: `jobs/toy_pairs.py` (oracle-labelled pairs), `jobs/train_drm.py --config toy
--pairs ...`, `jobs/step_grpo.py --config toy reward.drm_path=...`, `jobs/sample.py --config toy`, and
`bench/reproduce.py` runs the whole chain. The job logs the loss to MLflow and writes `<model.path>/toy_meta.json`
with the oracle's grade of ODE samples of every caption (how often the checkpoint follows its caption) and
`<model.path>/samples.png`, one sample per caption (rows of 15: each colour x shape at the 5 positions, then counts).
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
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps (batch 64; ~0.18 s each on 2 cores)")
    parser.add_argument("--dataset-size", type=int, default=20_000, help="procedural scenes drawn once")
    parser.add_argument("--extra-object-rate", type=float, default=0.6,
                        help="fraction of training images that also show an object their caption does not mention "
                             "(drm_ray.toy.world.scene), the reproduction's world; the model learns to add one now "
                             "and then (0.6: 11%% of ODE samples, 22%% of SDE rollouts). 0 for the plain world")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one process uses the whole machine)")
    args = parser.parse_intermixed_args(argv)
    cfg = job_config(args)
    if cfg.model.preset != "toy":
        parser.error(f"pretrain_toy pre-trains the toy preset; --config {args.config} has model.preset="
                     f"{cfg.model.preset}")
    if args.steps < 1 or args.dataset_size < 64:
        parser.error("--steps must be >= 1 and --dataset-size >= 64")
    if not 0.0 <= args.extra_object_rate <= 1.0:
        parser.error(f"--extra-object-rate must be in [0, 1], got {args.extra_object_rate}")
    job_env(cfg.model.preset)
    import torch

    torch.set_num_threads(args.threads)
    from drm_ray.toy.pretrain import pretrain_toy
    from drm_ray.tracking import Tracker

    m = cfg.model
    target = Path(m.path).resolve()
    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, out, run_name="pretrain_toy",
                      tags={"job": "pretrain_toy"})
    tracker.log_params({"steps": args.steps, "dataset_size": args.dataset_size,
                       "extra_object_rate": args.extra_object_rate, **{
        k: v for k, v in cfg.flat().items() if k.startswith("model.")}})

    def log(metrics: dict, step: int) -> None:
        tracker.log_metrics(metrics, step)
        print(f"[pretrain_toy] step {step}/{args.steps} loss {metrics['train/loss']:.4f} "
              f"({metrics['train/steps_per_s']:.1f} steps/s)", flush=True)

    meta = pretrain_toy(target, seed=m.seed, dataset_size=args.dataset_size, num_layers=m.num_layers,
                        num_attention_heads=m.num_attention_heads, attention_head_dim=m.attention_head_dim,
                        max_sequence_length=m.max_sequence_length, steps=args.steps,
                        eval_steps=cfg.sampling.eval_num_steps, eval_guidance=cfg.sampling.guidance_scale,
                        extra_object_rate=args.extra_object_rate, log=log)
    q = meta["samples"]
    tracker.log_metrics({"eval/oracle_score": q["oracle_mean"], "eval/oracle_correct": q["correct_fraction"],
                         "train/minutes": meta["training"]["total_seconds"] / 60}, args.steps)
    tracker.log_text(json.dumps(meta, indent=2), "toy_meta.json")
    from PIL import Image

    tracker.log_image(Image.open(target / "samples.png"), "samples.png")  # one ODE sample per caption
    tracker.end()
    print(f"[pretrain_toy] checkpoint in {target} ({meta['training']['total_seconds'] / 60:.1f} min); ODE samples "
          f"follow their caption {100 * q['correct_fraction']:.0f}% of the time (oracle {q['oracle_mean']:.3f}; "
          f"the dataset itself: {meta['dataset']['oracle_mean']:.3f})", flush=True)
    return meta


if __name__ == "__main__":
    run_job(main)
