"""Benchmark: what Ray costs a Step-GRPO iteration, and what a second rollout worker buys (not a test).

    python bench/overhead.py                          # small preset, 3 timed iterations, 1 and 2 rollout workers
    python bench/overhead.py --config tiny --steps 5 --workers 1
    python bench/overhead.py --mlflow                 # also log the tables to MLflow (sqlite in --out)

Three fresh subprocesses, same config, same seeds, same untrained DRM (timings only):
- `single`: ONE plain process, no Ray: `RolloutWorker` and `RewardScorer` as plain objects, `learner_batch`, and the
  learner's `train_update` on a DeepSpeed engine over gloo with world size 1; the same chunking, prompt sampler and
  LoRA hand-over (`lora_state` -> `set_lora`) as the driver.
- `ray`: `StepGRPODriver(cfg).step()` in-process (1 scorer, N rollout workers, 1 Ray Train learner worker), with the
  worker classes replaced by subclasses that time their methods inside the actor, so each phase splits into in-actor
  compute and the rest (serialization, object-store transfer, scheduling and waiting). The learner's compute is its
  own `timing/learner_compute`, which includes the per-update state save of fault tolerance; the single process
  times that save separately.
One warm-up iteration, then `--steps` timed ones (means). The first timed iterations of both modes use the same
policy versions and batches, so their losses must agree (printed as a check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, format_table, log_to_mlflow, setup_env  # noqa: E402

setup_env()

PHASES = ("rollout", "score", "learn", "sync")
ROLE_OF_ACTOR = {"TimedRolloutWorker": "rollout worker(s)", "TimedRewardScorer": "reward scorer",
                 "RayTrainWorker": "learner worker", "Coordinator": "learner coordinator"}
RAY_TRAIN_ACTORS = ("TrainController", "SynchronizationActor", "DatasetManager", "PreemptionWatcher",
                    "PlacementGroupCleaner", "_AutoscalingCoordinatorActor")


def bench_config(args, out: Path, workers: int):
    from drm_ray.config import load_config

    # serial schedule: the phases must not overlap for the per-phase breakdown (pipelining is measured in
    # docs/PIPELINE.md); an override on the command line wins
    return load_config(args.config, ["grpo.schedule=serial", *args.overrides, f"run.output_dir={out}", f"reward.drm_path={out.parent / 'drm'}",
                                     f"rollout.num_workers={workers}", "grpo.iterations=100000",
                                     "grpo.eval_every=100000", "grpo.checkpoint_every=100000"], job="step_grpo")


# ---------------------------------------------------------------------------------------------- single process


def run_single(args, out: Path) -> dict:
    import torch

    from drm_ray.algorithms.rl_batch import learner_batch, scoring_requests, split_scores
    from drm_ray.data.prompt_table import encode_prompt_table
    from drm_ray.data.prompts import PromptSampler, load_prompts
    from drm_ray.models.lora import lora_state
    from drm_ray.models.sd3 import model_kwargs, torch_dtype
    from drm_ray.workers.learner import train_update
    from drm_ray.workers.rollout import RolloutWorker
    from drm_ray.workers.scorer import RewardScorer
    from common import learner_engine, learner_train_cfg, pickle_cost, single_process_group

    cfg = bench_config(args, out, 1)
    torch.set_num_threads(1)
    g, s, kw = cfg.grpo, cfg.sampling, model_kwargs(cfg.model, cfg.sampling)
    branch = cfg.branch_steps()
    prompts = load_prompts(cfg.data.prompts, cfg.model.preset)
    table = encode_prompt_table(prompts, s.negative_prompt, cfg.model.preset, kw)
    sampling, lora = cfg.rollout_sampling(), cfg.lora_spec()
    worker = RolloutWorker(cfg.model.preset, kw, lora, table, sampling, g.algo, 1)
    scorer = RewardScorer(["drm"], table, preset=cfg.model.preset, drm_path=cfg.reward.drm_path)
    single_process_group()
    train_cfg = learner_train_cfg(cfg, g.prompts_per_iter * len(branch))
    engine, transformer, sigmas = learner_engine(cfg, train_cfg)
    publish = torch_dtype(cfg.learner.publish_dtype)
    sampler, version = PromptSampler(len(prompts), cfg.run.seed), 0
    worker.set_lora(version, lora_state(transformer, publish))
    per_call = cfg.rollout.groups_per_call
    iters = []
    for it in range(args.steps + 1):
        t, start = {}, time.perf_counter()
        groups = sampler.next(g.prompts_per_iter)
        t0 = time.perf_counter()
        rollouts = [r for lo in range(0, len(groups), per_call) for r in worker.rollout(groups[lo:lo + per_call],
                                                                                        version)]
        t["rollout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat, lvl, idx, _ = scoring_requests(rollouts, g.algo, sigmas)
        child, final = split_scores(rollouts, g.algo, scorer.score(lat, lvl, idx))
        t["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch, _ = learner_batch(rollouts, g.algo, child, final, len(branch), g.adv_clip)
        t["batch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = train_update(engine, transformer, batch, batch["states"].shape[0], 1, table, sigmas, train_cfg)
        t["learn"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        version += 1
        worker.set_lora(version, lora_state(transformer, publish))
        t["sync"] = time.perf_counter() - t0
        t["iteration"] = time.perf_counter() - start
        t["loss"] = stats["train/loss"]
        iters.append(t)
    # what the Ray path does on top: copies of these payloads, and the learner's per-update state save
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine.save_checkpoint(tmp, tag="v000001", client_state={"version": 1})
        save_s = time.perf_counter() - t0
    payloads = {"rollouts": pickle_cost(rollouts), "learner batch": pickle_cost(batch),
                "LoRA state": pickle_cost(lora_state(transformer, publish)),
                "score request": pickle_cost((lat, lvl, idx))}
    return {"iters": iters, "state_save_s": save_s, "payloads": payloads,
            "candidates": sum(r.children.shape[0] * r.children.shape[1] for r in rollouts)}


# ---------------------------------------------------------------------------------------------- Ray


def timed_classes():
    """Subclasses of the worker classes that record how long each method ran inside the actor."""
    from drm_ray.workers.rollout import RolloutWorker
    from drm_ray.workers.scorer import RewardScorer

    def timed(name, fn):
        def wrapper(self, *a, **k):
            start = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                self.bench_times.setdefault(name, []).append(time.perf_counter() - start)
        return wrapper

    def take(self):
        from pathlib import Path

        out, self.bench_times = dict(getattr(self, "bench_times", {})), {}
        hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
        return out, int(hwm[0].split()[1]) / 1024  # peak RSS, MB

    worker = type("TimedRolloutWorker", (RolloutWorker,), {
        "bench_times": {}, "take_times": take, "rollout": timed("rollout", RolloutWorker.rollout),
        "set_lora": timed("set_lora", RolloutWorker.set_lora)})
    scorer = type("TimedRewardScorer", (RewardScorer,), {
        "bench_times": {}, "take_times": take, "score_rollouts": timed("score", RewardScorer.score_rollouts)})
    return worker, scorer


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (group, CPU seconds used so far)} for every process on the machine (psutil): where the cores went."""
    import os

    import psutil

    snap = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            cmd, t = p.info["cmdline"] or [""], p.info["cpu_times"]
        except (psutil.Error, TypeError):
            continue
        if t is None:
            continue
        head = cmd[0]
        if p.info["pid"] == os.getpid():
            group = "driver (this process)"
        elif head.startswith("ray::"):
            name = head[5:].split(".")[0].split(" ")[0]
            group = ROLE_OF_ACTOR.get(name, "Ray Train control actors" if name in RAY_TRAIN_ACTORS
                                      else "Ray system (gcs, raylet, agents, monitors)")
        elif any(x in " ".join(cmd[:3]) for x in ("gcs_server", "raylet", "dashboard", "monitor.py", "agent")):
            group = "Ray system (gcs, raylet, agents, monitors)"
        else:
            group = "other processes"
        snap[p.info["pid"]] = (group, t.user + t.system)
    return snap


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, (group, t) in after.items():
        out[group] = out.get(group, 0.0) + t - before.get(pid, (group, 0.0))[1]
    return out


def run_ray(args, out: Path, workers: int) -> dict:
    import ray

    import drm_ray.rl_setup as rl_setup
    from drm_ray.runtime import job_env

    cfg = bench_config(args, out, workers)
    job_env(cfg.model.preset, cfg.model.path)
    rl_setup.RolloutWorker, rl_setup.RewardScorer = timed_classes()  # in-actor timing; the logic is unchanged
    from drm_ray.driver import StepGRPODriver

    t0 = time.perf_counter()
    driver = StepGRPODriver(cfg)
    startup = time.perf_counter() - t0
    actors = driver.rl.workers + driver.rl.scorers
    iters = []
    for it in range(args.steps + 1):
        ray.get([a.take_times.remote() for a in actors])  # clear what set-up and earlier calls recorded
        snap, t0 = cpu_snapshot(), time.perf_counter()
        m = driver.step()
        wall = time.perf_counter() - t0
        cpu = cpu_by_group(snap, cpu_snapshot())
        got = ray.get([a.take_times.remote() for a in actors])
        w_times, s_times = [g[0] for g in got[:workers]], [g[0] for g in got[workers:]]
        iters.append({"step_wall": wall, "cpu": cpu, **{k: v for k, v in m.items() if k.startswith("timing/")},
                      "loss": m["train/loss"], "candidates_per_s": m["rollout/candidates_per_s"],
                      "rollout_compute": sum(sum(w.get("rollout", [])) for w in w_times),
                      "rollout_busiest": max(sum(w.get("rollout", [])) for w in w_times),
                      "rollout_calls": [sum(w.get("rollout", [])) for w in w_times],
                      "sync_compute": max(sum(w.get("set_lora", [])) for w in w_times),
                      "score_compute": sum(sum(s.get("score", [])) for s in s_times)})
    rss = {"rollout worker": max(g[1] for g in got[:workers]), "scorer": max(g[1] for g in got[workers:])}
    driver.rl.shutdown()
    driver.tracker.end()
    ray.shutdown()
    return {"iters": iters, "startup_s": startup, "actor_peak_rss_mb": rss}


# ---------------------------------------------------------------------------------------------- report


def mean(iters: list[dict], key: str) -> float:
    timed = iters[1:]  # the first is the warm-up
    return sum(i[key] for i in timed) / len(timed)


def losses(run: dict) -> str:
    return ", ".join(f"{i['loss']:.4e}" for i in run["iters"])


def report(args, single: dict, rays: dict[int, dict]) -> tuple[str, dict]:
    r1 = rays[min(rays)]
    it_ = lambda k: mean(r1["iters"], k)  # noqa: E731
    sg = lambda k: mean(single["iters"], k)  # noqa: E731
    rows, metrics = [], {}
    save = single["state_save_s"]
    compute = {"rollout": it_("rollout_compute"), "score": it_("score_compute"),
               "learn": it_("timing/learner_compute"), "sync": it_("sync_compute")}
    for ph in PHASES:
        wall = it_(f"timing/{ph}")
        rows.append([ph, sg(ph), wall, compute[ph], wall - compute[ph], wall / sg(ph)])
    driver_own = it_("timing/iteration") - sum(it_(f"timing/{p}") for p in PHASES)
    rows.append(["driver (batch, advantages)", sg("batch"), driver_own, driver_own, 0.0, driver_own / sg("batch")])
    rows.append(["iteration (timing/iteration)", sg("iteration"), it_("timing/iteration"), "", "",
                 it_("timing/iteration") / sg("iteration")])
    rows.append(["step() incl. MLflow log + print", sg("iteration"), it_("step_wall"), "", "",
                 it_("step_wall") / sg("iteration")])
    title = (f"Step-GRPO iteration, Ray (1 rollout worker, 1 scorer, 1 learner) vs ONE process without Ray; preset "
             f"{args.config}, mean of {args.steps} iterations after 1 warm-up; seconds")
    text = format_table(["phase", "single", "Ray wall", "in-actor compute", "wall - compute", "Ray/single"], rows,
                        title)
    ratio = it_("step_wall") / sg("iteration")
    lines = [text, "",
             f"ratio distributed / single-process: {ratio:.3f}x per step() (target <= 1.10x); "
             f"{it_('timing/iteration') / sg('iteration'):.3f}x for timing/iteration (without MLflow logging)",
             f"learner compute in Ray includes the per-update learner state save (learner.max_failures > 0): "
             f"{save:.3f} s measured in the single process; learner compute without it {compute['learn'] - save:.3f}"
             f" s vs {sg('learn'):.3f} s single",
             f"losses of all iterations (warm-up first), single: {losses(single)}; Ray: {losses(r1)}",
             f"Ray start-up (actors, Ray Train fit, first LoRA): {r1['startup_s']:.1f} s; actor peak RSS (MB): "
             f"{ {k: round(v) for k, v in r1['actor_peak_rss_mb'].items()} }", ""]
    if "cpu" in r1["iters"][-1]:
        groups = sorted({g for i in r1["iters"][1:] for g in i["cpu"]})
        cpu = [[g, mean([{"v": i["cpu"].get(g, 0.0)} for i in r1["iters"]], "v")] for g in groups]
        cpu.append(["step wall x cores available", it_("step_wall") * cpu_count()])
        lines += [format_table(["process group", "CPU s per step"], cpu,
                               "Where the CPU went during a Ray step (psutil CPU times, mean of timed steps)"), ""]
    pay = [[name, mb, s] for name, (mb, s) in single["payloads"].items()]
    lines.append(format_table(["payload (per iteration)", "MB", "pickle dumps+loads s"], pay,
                              "Serialization floor of what crosses process boundaries"))
    metrics.update({"overhead/ratio_step": ratio, "overhead/single_iteration_s": sg("iteration"),
                    "overhead/ray_step_s": it_("step_wall"), "overhead/state_save_s": save})
    if len(rays) > 1:
        rows = []
        base = None
        for n, r in sorted(rays.items()):
            cps = single["candidates"] / mean(r["iters"], "timing/rollout")
            base = base or cps
            rows.append([n, mean(r["iters"], "timing/rollout"), mean(r["iters"], "rollout_busiest"),
                         str([round(x, 3) for x in r["iters"][-1]["rollout_calls"]]), cps, f"{cps / base:.2f}x"])
            metrics[f"overhead/rollout_candidates_per_s_w{n}"] = cps
        lines += ["", format_table(["rollout workers", "rollout wall s", "busiest worker compute s",
                                    "per-worker compute s (last iter)", "candidates/s", "speed-up"], rows,
                                   f"Rollout throughput vs rollout workers (target >= 1.8x at 2); {cpu_note()}")]
    return "\n".join(lines), metrics


def cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def cpu_note() -> str:
    return f"{cpu_count()} CPU cores, shared with the scorer, the learner and the driver"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations after 1 warm-up")
    parser.add_argument("--workers", default="1,2", help="rollout worker counts for the Ray runs")
    parser.add_argument("--out", default=None, help="work directory (default outputs/bench_overhead_<config>)")
    parser.add_argument("--mlflow", action="store_true", help="log the tables to MLflow")
    parser.add_argument("--part", choices=["single", "ray"], help=argparse.SUPPRESS)  # a child process's role
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out or ROOT / "outputs" / f"bench_overhead_{args.config}").resolve()
    if args.part:
        n = int(args.workers)
        res = run_single(args, out / "single") if args.part == "single" else run_ray(args, out / f"ray_w{n}", n)
        (out / f"{args.part}_{n}.json").write_text(json.dumps(res))
        return
    out.mkdir(parents=True, exist_ok=True)
    from common import untrained_drm
    from drm_ray.config import load_config

    untrained_drm(load_config(args.config, args.overrides), out / "drm")
    counts = [int(v) for v in args.workers.split(",")]
    parts = [("single", 1)] + [("ray", n) for n in counts]
    for part, n in parts:  # fresh processes: no state, memory or threads shared between the modes
        print(f"[bench] {part} (rollout workers {n}) ...", flush=True)
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--workers", str(n),
               "--out", str(out), "--part", part, *args.overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
    single = json.loads((out / "single_1.json").read_text())
    rays = {n: json.loads((out / f"ray_{n}.json").read_text()) for n in counts}
    text, metrics = report(args, single, rays)
    print("\n" + text, flush=True)
    (out / "overhead.txt").write_text(text + "\n")
    if args.mlflow:
        log_to_mlflow("overhead", out, {"config": args.config, "steps": args.steps, "workers": args.workers},
                      metrics, text)


if __name__ == "__main__":
    main()
