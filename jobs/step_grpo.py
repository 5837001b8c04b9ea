"""Step-GRPO (or GRPO) LoRA fine-tuning of an SD3 model against a Diffusion-based Reward Model, on Ray.

    python jobs/step_grpo.py                               # tiny preset, CPU, local Ray, a few minutes
    python jobs/step_grpo.py --algo grpo grpo.iterations=40
    ray job submit --working-dir . -- python jobs/step_grpo.py --config sd35m \\
        model.path=/models/sd3.5-medium reward.drm_path=/ckpt/drm data.prompts=/data/prompts.txt \\
        rollout.num_workers=8 run.output_dir=/shared/runs/exp1

Rollout workers and DRM scorers are Ray actors, the learner is one long-lived Ray Train TorchTrainer with DeepSpeed
ZeRO-2 over the LoRA parameters, and this process is the driver. Without reward.drm_path the tiny preset trains a
DRM on the synthetic preference set first (or reuses `<run.output_dir>/drm`). Outputs in run.output_dir: MLflow
(sqlite mlflow.db unless tracking.tracking_uri / MLFLOW_TRACKING_URI), checkpoints/iter-N (resubmitting with the
same output directory resumes from the newest), lora/ (diffusers format) and summary.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drm_ray.console import add_config_args, job_config, run_job  # noqa: E402
from drm_ray.runtime import job_env  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--algo", choices=["step_grpo", "grpo"], help="shorthand for grpo.algo=...")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"grpo.algo={args.algo}"] if args.algo else [])
    cfg = job_config(args, overrides, job="step_grpo")
    job_env(cfg.model.preset, cfg.model.path)

    from drm_ray.driver import StepGRPODriver

    return StepGRPODriver(cfg).run()


if __name__ == "__main__":
    run_job(main)
