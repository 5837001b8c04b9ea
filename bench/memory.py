"""Benchmark: peak resident memory per role (rollout worker, DRM scorer, learner worker, driver) per preset.

    python bench/memory.py                            # tiny and small
    python bench/memory.py --presets small --mlflow

Each role runs in a fresh subprocess doing what the role does in a Step-GRPO job: its construction plus one unit of
work (a rollout call of `groups_per_call` groups; scoring one iteration's children and final latents; one
`train_update` on a DeepSpeed engine, gloo, world size 1, over one iteration's batch; for the driver: its imports,
the prompt table, the panel VAE, an MLflow tracker, one iteration's rollouts, `learner_batch` and a panel decode),
and reports its peak RSS (VmHWM; `ru_maxrss` would carry the parent's high-water mark over exec). `imports` is the
floor of a process that imports everything (torch, diffusers, peft, DeepSpeed, drm_ray); a rollout worker or scorer
never imports DeepSpeed, so it can sit below it. `ray system` starts a local Ray (no dashboard) and sums the RSS of
the processes it spawned (GCS, raylet, idle workers): memory the driver's machine pays on top. The payloads (one
iteration's rollouts, the learner batch) are made once per preset in the parent and loaded by the children, so no
child's peak includes another role's model. Inside Ray each actor also carries Ray's worker runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, format_table, log_to_mlflow, peak_rss_mb, setup_env  # noqa: E402

setup_env()

ROLES = ("imports", "rollout worker", "DRM scorer", "learner worker", "driver", "ray system")


def prepare(cfg, work: Path) -> None:
    """One iteration's rollouts (plain RolloutWorker, untrained DRM scores) and the learner batch, saved to files."""
    import torch

    from common import untrained_drm
    from drm_ray.algorithms.rl_batch import learner_batch, scoring_requests, split_scores
    from drm_ray.data.prompt_table import encode_prompt_table
    from drm_ray.data.prompts import PromptSampler, load_prompts
    from drm_ray.diffusion.flow import schedule_sigmas
    from drm_ray.models.sd3 import model_kwargs
    from drm_ray.workers.rollout import RolloutWorker
    from drm_ray.workers.scorer import RewardScorer

    kw = model_kwargs(cfg.model, cfg.sampling)
    prompts = load_prompts(cfg.data.prompts, cfg.model.preset)
    table = encode_prompt_table(prompts, cfg.sampling.negative_prompt, cfg.model.preset, kw)
    worker = RolloutWorker(cfg.model.preset, kw, cfg.lora_spec(), table, cfg.rollout_sampling(), cfg.grpo.algo, 1)
    groups = PromptSampler(len(prompts), cfg.run.seed).next(cfg.grpo.prompts_per_iter)
    rollouts = worker.rollout(groups, -1)
    scorer = RewardScorer(["drm"], table, preset=cfg.model.preset, drm_path=str(untrained_drm(cfg, work / "drm")))
    request = scoring_requests(rollouts, cfg.grpo.algo, worker.sigmas)
    child, final = split_scores(rollouts, cfg.grpo.algo, scorer.score(*request))
    batch, _ = learner_batch(rollouts, cfg.grpo.algo, child, final, len(cfg.branch_steps()), cfg.grpo.adv_clip)
    torch.save({"table": table, "groups": groups, "rollouts": rollouts, "request": request, "batch": batch,
                "sigmas": schedule_sigmas(worker.scheduler, cfg.sampling.num_steps)}, work / "payload.pt")


def run_role(role: str, cfg, work: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from drm_ray.models.sd3 import model_kwargs

    if role == "imports":
        import deepspeed  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401

        import drm_ray.workers.learner  # noqa: F401
        import drm_ray.workers.rollout  # noqa: F401
        return {}
    if role == "ray system":
        return ray_system()
    payload = torch.load(work / "payload.pt", weights_only=False)
    kw, table = model_kwargs(cfg.model, cfg.sampling), payload["table"]
    if role == "rollout worker":
        from drm_ray.workers.rollout import RolloutWorker

        worker = RolloutWorker(cfg.model.preset, kw, cfg.lora_spec(), table, cfg.rollout_sampling(), cfg.grpo.algo, 1)
        worker.rollout(payload["groups"][:cfg.rollout.groups_per_call], -1)
    elif role == "DRM scorer":
        from drm_ray.workers.scorer import RewardScorer

        RewardScorer(["drm"], table, preset=cfg.model.preset, drm_path=str(work / "drm")).score(*payload["request"])
    elif role == "learner worker":
        from common import learner_engine, learner_train_cfg, single_process_group
        from drm_ray.workers.learner import train_update

        batch = payload["batch"]
        single_process_group()
        train_cfg = learner_train_cfg(cfg, batch["states"].shape[0])
        engine, transformer, sigmas = learner_engine(cfg, train_cfg)
        train_update(engine, transformer, batch, batch["states"].shape[0], 1, table, sigmas, train_cfg)
    elif role == "driver":
        driver_role(cfg, work, payload)
    return {}


def driver_role(cfg, work: Path, payload: dict) -> None:
    import torch

    import drm_ray.driver  # noqa: F401  (ray, mlflow and the rest of the driver's imports)
    from drm_ray.algorithms.rl_batch import learner_batch, reward_stats, split_scores
    from drm_ray.data.prompt_table import encode_prompt_table
    from drm_ray.data.prompts import load_prompts
    from drm_ray.diffusion.sampling import decode_latents
    from drm_ray.models.sd3 import build_components, model_kwargs
    from drm_ray.tracking import Tracker
    from drm_ray.workers.rollout import split_rollouts

    kw = model_kwargs(cfg.model, cfg.sampling)
    prompts = load_prompts(cfg.data.prompts, cfg.model.preset)
    encode_prompt_table(prompts, cfg.sampling.negative_prompt, cfg.model.preset, kw)
    vae = build_components(cfg.model.preset, text=False, vae=True, device="cpu", **kw).vae
    tracker = Tracker(None, "drm-ray-bench-memory", work / "driver")
    rollouts, _ = split_rollouts(payload["rollouts"])  # the driver holds records; the latents stay in the store
    n = payload["request"][0].shape[0]
    child, final = split_scores(rollouts, cfg.grpo.algo, torch.randn(n))
    learner_batch(rollouts, cfg.grpo.algo, child, final, len(cfg.branch_steps()), cfg.grpo.adv_clip)
    tracker.log_metrics(reward_stats(rollouts, cfg.grpo.algo, child, final, cfg.branch_steps()), 1)
    decode_latents(vae, torch.stack([r.final[0] for r in payload["rollouts"]][:8]))  # the panel's latents
    tracker.end()


def ray_system() -> dict:
    """RSS (MB) of the processes a local `ray.init` spawns (no dashboard), after they settle."""
    import psutil
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    time.sleep(10)  # idle workers start lazily; let the pool settle
    procs = psutil.Process().children(recursive=True)
    total = sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    ray.shutdown()
    return {"children_rss_mb": total, "processes": len(procs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--out", default=None, help="work directory (default outputs/bench_memory)")
    parser.add_argument("--mlflow", action="store_true", help="log the table to MLflow")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)  # a child process's role
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out or ROOT / "outputs" / "bench_memory").resolve()
    from drm_ray.config import load_config

    if args.role:
        extra = run_role(args.role, load_config(args.preset), out / args.preset)
        print(json.dumps({"peak_rss_mb": peak_rss_mb(), **extra}), flush=True)
        return
    presets = args.presets.split(",")
    res: dict[str, dict[str, dict]] = {}
    for preset in presets:
        (out / preset).mkdir(parents=True, exist_ok=True)
        prepare(load_config(preset), out / preset)
        for role in ROLES:
            if role == "ray system" and preset != presets[0]:
                continue  # independent of the preset
            cmd = [sys.executable, __file__, "--out", str(out), "--role", role, "--preset", preset]
            proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
            res.setdefault(role, {})[preset] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[bench] {preset} {role}: {res[role][preset]}", flush=True)
    rows, metrics = [], {}
    for role in ROLES:
        cells = []
        for p in presets:
            r = res[role].get(p) or res[role][presets[0]]
            mb = r.get("children_rss_mb", r["peak_rss_mb"])
            cells.append(round(mb))
            metrics[f"memory/{role.replace(' ', '_')}_{p}_mb"] = mb
        rows.append([role, *cells])
    text = format_table(["role", *[f"{p} peak RSS MB" for p in presets]], rows,
                        "Peak resident memory per role (fresh process each; VmHWM; 'ray system' = sum of the "
                        "RSS of a local Ray's own processes, preset-independent)")
    print("\n" + text, flush=True)
    (out / "memory.txt").write_text(text + "\n")
    if args.mlflow:
        log_to_mlflow("memory", out, {"presets": args.presets}, metrics, text)


if __name__ == "__main__":
    main()
