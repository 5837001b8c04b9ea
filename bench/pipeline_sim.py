"""Benchmark tool: replay one iteration's per-role costs on a GPU layout, serial or pipelined (a simulator, not a test).

    python bench/pipeline_sim.py --sd35m                        # forward-count model of the sd35m preset: layouts
    python bench/pipeline_sim.py --sd35m --gpus 8 --forward-ms 30
    python bench/pipeline_sim.py --rollout-s 40 --score-s 90 --learn-s 120 --sync-s 2 --chunks 4 --layout 4,1,2
    python bench/pipeline_sim.py --from-mlflow sqlite:///outputs/tiny/mlflow.db --run RUN_ID --layout 2,1,1

An iteration's work is given as seconds of ONE unit of each role for the WHOLE batch (`rollout`: one rollout worker
sampling every group; `score`: one scorer scoring every child; `learn`: one learner rank training on every state;
`sync`: publishing the new LoRA to the workers), split into `chunks` rollout calls (groups_per_call groups each) and
`updates` minibatches (optimizer steps, each ending in a gradient all-reduce of `allreduce` seconds when W > 1).

Layouts: `N,M,W` puts N rollout workers, M scorers and W learner ranks on separate GPUs (the sd35m preset: 4,1,2);
`colocated:G` puts one of each role on each of G GPUs (the paper's own set-up: every GPU samples, scores and learns).
The iteration is played as events (`run_tasks`): rollout chunks (each worker takes the next chunk when free), scoring
calls, the learner's cells as drm_ray deals them (`IterationLayout`: each rank trains its micro-batch rows in
order, each minibatch ends in an all-reduce when W > 1), then the sync. Schedules:
- serial: every rollout, then every scoring call, then the learner, then sync (grpo.schedule=serial).
- pipelined: a chunk is scored as soon as it is rolled out and a scorer is free; a learner row starts as soon as
  every group it touches is scored and the rank's previous row is done (the default schedule).
  Colocated GPUs run their roles one after another either way.
`--cores C` makes the roles share C CPU cores (each running task progresses at min(1, C / running tasks)), as on a
CPU machine; without it every unit has its own device.
Output: iteration time, the longest phase (the bound no schedule beats), iteration / longest phase, each role's busy
seconds and utilization (busy / iteration), and the critical path. With --sd35m it also searches every split of the
GPUs and ranks the layouts.

Where the costs come from:
- `--from-mlflow URI --run ID`: a measured run's means (after the first iteration) of timing/rollout x N (rollout
  workers run in parallel), timing/score x M, timing/learner_compute x W and timing/sync, with N, M, W, the groups per
  call and updates per iteration from the run's params.
- `--sd35m`: counts of sequence forwards per iteration from the sd35m preset (rollout: groups x steps x 2 for CFG;
  scoring: every child plus every final image through (24 - 3) / 24 of the transformer; learning: per state a CFG
  forward + backward, about 3 forwards each, plus the reference's CFG forward for the KL), times `--forward-ms` per
  sequence forward. An ASSUMPTION, not a measurement: batching makes the scorer (batch 64) cheaper per forward than
  the rollout workers (a few sequences per call); `--score-efficiency` scales that. The ranking of layouts depends on
  the ratios only; bench/gpu_check.py on a GPU measures them.

Checked against measured CPU runs (tiny preset, 8 prompt groups of 3 states in 4 chunks, 8 iterations, means after
the first; docs/PIPELINE.md): costs read from a serial run predict pipelined runs with 1 and 2 rollout workers within
4% and 1% with `--cores 2` (the machine's), and the serial run itself 11.5% short (the driver's hand-offs between
phases are not charged).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Costs:
    rollout: float   # seconds, one rollout worker, the whole batch
    score: float     # seconds, one scorer, the whole batch
    learn: float     # seconds, one learner rank, the whole batch
    sync: float      # seconds per iteration
    chunks: int      # rollout calls per iteration
    updates: int = 1
    allreduce: float = 0.0  # seconds per optimizer step with W > 1
    groups: int = 0         # prompt groups per iteration (0: one per chunk)
    per_group: int = 1      # trained states per group
    accum: int = 1          # learner micro-batch rows per optimizer step (`IterationLayout.accum`)

    def layout(self, w: int):
        """The learner's cells for W ranks, as drm_ray deals them (`IterationLayout`)."""
        from drm_ray.algorithms.rl_batch import IterationLayout

        return IterationLayout(self.groups or self.chunks, self.per_group, self.updates, w, self.accum)


@dataclass
class Result:
    schedule: str
    layout: str
    iteration: float
    longest_phase: float
    busy: dict[str, float] = field(default_factory=dict)     # role -> busy seconds per GPU of that role
    gpus: dict[str, int] = field(default_factory=dict)       # role -> GPUs
    critical: str = ""

    @property
    def ratio(self) -> float:
        return self.iteration / self.longest_phase if self.longest_phase else float("nan")

    def utilization(self) -> dict[str, float]:
        return {role: b / self.iteration for role, b in self.busy.items()}

    def mean_utilization(self) -> float:
        total = sum(self.gpus.values())
        return sum(self.busy[r] * self.gpus[r] for r in self.busy) / (total * self.iteration)


@dataclass(eq=False)
class Task:
    name: str
    role: str                 # the pool of units that runs it
    cost: float               # seconds at full speed
    deps: list["Task"] = field(default_factory=list)
    unit: int | None = None   # a fixed unit of the role (a learner rank), else the first free one
    cpu: bool = True          # competes for the shared cores (--cores); an all-reduce does not
    start: float = -1.0
    end: float = -1.0


def run_tasks(tasks: list[Task], units: dict[str, int], cores: float | None = None) -> float:
    """Play `tasks` on `units` machines per role; returns the makespan and sets each task's start and end.

    A free unit takes the first task of its role, in list order, whose dependencies are done; a task pinned to a unit
    (`unit`) is taken only by that unit and only in order (a learner rank trains its cells one after another). With
    `cores`, every running CPU task progresses at min(1, cores / running CPU tasks) (processor sharing): the roles
    of a CPU run share its cores, where on a GPU cluster each has its own device (cores=None).
    """
    pending = list(tasks)
    running: dict[tuple[str, int], tuple[Task, float]] = {}  # unit -> (task, remaining seconds of work)
    now = 0.0
    while pending or running:
        for role, count in units.items():
            for u in range(count):
                if (role, u) in running:
                    continue
                pinned = [x for x in pending if x.role == role and x.unit == u]
                heads = pinned[:1]  # a pinned unit works in order
                pool = [x for x in pending if x.role == role and x.unit is None]
                pick = next((x for x in heads + pool if all(d.end >= 0 for d in x.deps)), None)
                if pick is not None:
                    pick.start = now
                    pending.remove(pick)
                    running[(role, u)] = (pick, pick.cost)
        if not running:
            raise RuntimeError(f"simulation deadlock: {[x.name for x in pending][:5]} wait on unfinished work")
        busy_cpu = sum(1 for x, _ in running.values() if x.cpu)
        share = 1.0 if cores is None or busy_cpu <= cores else cores / busy_cpu
        rate = {k: (share if x.cpu else 1.0) for k, (x, _) in running.items()}
        dt = min(rem / rate[k] for k, (_, rem) in running.items())
        now += dt
        for k in list(running):
            x, rem = running[k]
            rem -= dt * rate[k]
            if rem <= 1e-12:
                x.end = now
                del running[k]
            else:
                running[k] = (x, rem)
    return now


def iteration_tasks(c: Costs, w: int, schedule: str) -> tuple[list[Task], dict[str, list[Task]]]:
    """One iteration as tasks: rollout chunks, scoring chunks, the learner's cells (per rank, row by row, each
    minibatch ending in an all-reduce when W > 1), then sync. Serial: each phase waits for the whole previous one.
    Pipelined: a chunk is scored when it is rolled out, a learner row starts when every group it touches is scored."""
    groups = c.groups or c.chunks
    per_call = math.ceil(groups / c.chunks)
    chunk_of = lambda g: min(g // per_call, c.chunks - 1)  # noqa: E731
    roll = [Task(f"rollout {i}", "rollout", c.rollout / c.chunks) for i in range(c.chunks)]
    score = [Task(f"score {i}", "score", c.score / c.chunks, roll if schedule == "serial" else [roll[i]])
             for i in range(c.chunks)]
    lay = c.layout(w)
    total = groups * c.per_group
    cells, reduces, prev_reduce = [], [], []
    for j in range(lay.updates):
        mine = []
        for a in range(lay.accum):
            g_lo, g_hi = lay.row_groups(j, a)
            need = score if schedule == "serial" else [score[chunk_of(g)] for g in range(g_lo, max(g_hi, g_lo + 1))]
            for r in range(w):
                lo, hi = lay.cell_bounds(j, a, r)
                mine.append(Task(f"learn u{j} row{a} rank{r}", "learn", c.learn * (hi - lo) / total,
                                 need + prev_reduce, unit=r))
        cells += mine
        if w > 1:
            prev_reduce = [Task(f"all-reduce {j}", "comm", c.allreduce, mine, cpu=False)]
            reduces += prev_reduce
    sync = Task("sync", "sync", c.sync, cells + reduces + score)
    return roll + score + cells + reduces + [sync], {"rollout": roll, "score": score, "learn": cells, "sync": [sync]}


def simulate_split(c: Costs, n: int, m: int, w: int, schedule: str, cores: float | None = None) -> Result:
    """N rollout workers, M scorers, W learner ranks on separate GPUs (or sharing `cores` CPU cores)."""
    step_cost = c.allreduce if w > 1 else 0.0
    tasks, parts = iteration_tasks(c, w, schedule)
    end = run_tasks(tasks, {"rollout": n, "score": m, "learn": w, "comm": 1, "sync": 1}, cores)
    alone = lambda units, cost: math.ceil(c.chunks / units) * cost / c.chunks  # noqa: E731  a phase on its own
    longest = max(alone(n, c.rollout), alone(m, c.score), c.learn / w + c.updates * step_cost)
    t_roll = max(x.end for x in parts["rollout"])
    t_score = max(x.end for x in parts["score"])
    t_learn = max(x.end for x in parts["learn"])
    if schedule == "serial":
        phases = {"rollout": t_roll, "score": t_score - t_roll, "learn": t_learn - t_score, "sync": c.sync}
        critical = " -> ".join(f"{k} {v:.3g}s" for k, v in phases.items())
    else:
        rank0 = sorted((x for x in parts["learn"] if x.unit == 0), key=lambda x: x.start)
        waits = rank0[0].start + sum(b.start - a.end for a, b in zip(rank0, rank0[1:]))
        critical = (f"first chunk rolled out {min(x.end for x in parts['rollout']):.3g}s, last scored "
                    f"{t_score:.3g}s, learner rank 0 waited {waits:.3g}s, learned until {t_learn:.3g}s, "
                    f"sync {c.sync:.3g}s")
    busy = {"rollout": c.rollout / n, "score": c.score / m, "learn": c.learn / w + c.updates * step_cost}
    return Result(schedule, f"{n},{m},{w}", end, longest, busy, {"rollout": n, "score": m, "learn": w}, critical)


def simulate_colocated(c: Costs, g: int) -> Result:
    """G GPUs, each with one rollout worker, one scorer and one learner rank: roles share the device in turn."""
    step_cost = c.allreduce if g > 1 else 0.0
    per_gpu = (c.rollout + c.score + c.learn) / g + c.updates * step_cost
    end = per_gpu + c.sync
    busy = {"all roles": per_gpu}
    return Result("colocated", f"colocated:{g}", end, per_gpu, busy, {"all roles": g},
                  f"each GPU: rollout {c.rollout / g:.1f}s, score {c.score / g:.1f}s, learn {c.learn / g:.1f}s")


# ---------------------------------------------------------------------------------------------- cost sources


def sd35m_costs(forward_ms: float, score_efficiency: float, sync_s: float, allreduce_s: float,
                overrides: list[str] = ()) -> tuple[Costs, dict]:
    """Sequence-forward counts of one sd35m iteration (see the module doc) and the costs they imply."""
    from drm_ray.config import load_config
    from drm_ray.algorithms.rl_batch import grad_accum

    cfg = load_config("sd35m", list(overrides))
    s, g = cfg.sampling, cfg.grpo
    groups, steps, k = g.prompts_per_iter, s.num_steps, s.k
    branch = len(cfg.branch_steps())
    layers = 24  # SD3.5-Medium
    keep = (layers - cfg.drm.n_drop) / layers
    if g.algo == "step_grpo":
        children, states = groups * branch * k, groups * branch
        rollout_fw = groups * steps * 2
    else:
        children, states = groups * k, groups * k * branch
        rollout_fw = groups * k * steps * 2
    score_fw = (children + groups * (1 if g.algo == "step_grpo" else 0)) * keep / score_efficiency
    learn_fw = states * (2 * 3 + 2)  # CFG forward + backward (~3 forwards) and the reference CFG forward
    sec = forward_ms / 1000
    chunks = math.ceil(groups / cfg.rollout.groups_per_call)
    counts = {"groups": groups, "steps": steps, "k": k, "branching steps": branch, "children": children,
              "states": states, "rollout sequence forwards": rollout_fw, "scoring forwards (DRM-size adjusted)":
              round(score_fw, 1), "learner forward-equivalents": learn_fw, "chunks": chunks,
              "updates": g.updates_per_iter, "layout": (cfg.rollout.num_workers, cfg.rollout.num_scorers,
                                                        cfg.learner.num_workers)}
    per_group = states // groups
    accum = grad_accum(states, g.updates_per_iter, cfg.learner.num_workers, cfg.learner.micro_batch_states, per_group)
    counts["micro-batch rows per step"] = accum
    return Costs(rollout_fw * sec, score_fw * sec, learn_fw * sec, sync_s, chunks, g.updates_per_iter,
                 allreduce_s, groups, per_group, accum), counts


def mlflow_costs(uri: str, run_id: str) -> tuple[Costs, tuple[int, int, int]]:
    """Unit costs from a measured run (see the module doc) and the run's layout."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    p = run.data.params

    def mean(key: str) -> float:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda x: x.step)
        values = [h.value for h in hist[1:]] or [h.value for h in hist]  # the first iteration warms up
        if not values:
            raise SystemExit(f"error: run {run_id} has no metric {key}")
        return sum(values) / len(values)

    n, m, w = int(p["rollout.num_workers"]), int(p["rollout.num_scorers"]), int(p["learner.num_workers"])
    groups, per_call = int(p["grpo.prompts_per_iter"]), int(p["rollout.groups_per_call"])
    chunks = math.ceil(groups / per_call)
    names = set(run.data.metrics)
    if "busy/rollout_s" in names:  # the actors' summed call seconds: one unit doing the whole batch
        rollout, score = mean("busy/rollout_s"), mean("busy/score_s")
    else:  # a run from before busy/* existed (serial): the phase's wall time x the units that worked in parallel
        rollout, score = mean("timing/rollout") * min(n, chunks), mean("timing/score") * min(m, chunks)
    from drm_ray.algorithms.rl_batch import grad_accum

    branch = p.get("grpo.branch_steps", "None")
    steps = int(p["sampling.num_steps"]) - 1 if branch in ("None", "") else len(branch.strip("()[]").split(","))
    per_group = steps * (1 if p.get("grpo.algo", "step_grpo") == "step_grpo" else int(p["sampling.k"]))
    updates = int(p.get("grpo.updates_per_iter", 1))
    accum = grad_accum(groups * per_group, updates, w, int(p["learner.micro_batch_states"]), per_group)
    costs = Costs(rollout=rollout, score=score, learn=mean("timing/learner_compute") * w, sync=mean("timing/sync"),
                  chunks=chunks, updates=updates, groups=groups, per_group=per_group, accum=accum)
    return costs, (n, m, w)


# ---------------------------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    head = "| schedule | layout | GPUs | iteration s | longest phase s | iteration / longest | utilization per role " \
           "| mean GPU utilization |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        util = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.utilization().items())
        lines.append(f"| {r.schedule} | {r.layout} | {sum(r.gpus.values())} | {r.iteration:.3g} | "
                     f"{r.longest_phase:.3g} | {r.ratio:.2f} | {util} | {100 * r.mean_utilization():.0f}% |")
    return "\n".join(lines)


def layouts(total: int, max_learners: int = 4):
    for w in range(1, min(max_learners, total - 2) + 1):
        for m in range(1, total - w):
            yield total - m - w, m, w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--sd35m", action="store_true", help="the sd35m preset's forward counts (see above)")
    src.add_argument("--from-mlflow", metavar="URI", help="a tracking URI holding a measured run (with --run)")
    parser.add_argument("--run", help="MLflow run id (with --from-mlflow)")
    parser.add_argument("--rollout-s", type=float)
    parser.add_argument("--score-s", type=float)
    parser.add_argument("--learn-s", type=float)
    parser.add_argument("--sync-s", type=float, default=1.0)
    parser.add_argument("--chunks", type=int, default=4, help="rollout calls per iteration")
    parser.add_argument("--groups", type=int, default=None, help="prompt groups per iteration (default: --chunks)")
    parser.add_argument("--per-group", type=int, default=1, help="trained states per prompt group")
    parser.add_argument("--accum", type=int, default=1,
                        help="learner micro-batch rows per optimizer step (a row starts when its groups are scored)")
    parser.add_argument("--updates", type=int, default=None, help="optimizer steps per iteration")
    parser.add_argument("--allreduce-s", type=float, default=0.05, help="per optimizer step with W > 1")
    parser.add_argument("--layout", default=None, help="N,M,W or colocated:G (default: the source's)")
    parser.add_argument("--cores", type=float, default=None,
                        help="the roles share this many CPU cores (a CPU run) instead of a device each")
    parser.add_argument("--gpus", type=int, default=7, help="--sd35m: GPUs to split in the layout search")
    parser.add_argument("--forward-ms", type=float, default=30.0, help="--sd35m: ms per 512-px sequence forward")
    parser.add_argument("--score-efficiency", type=float, default=1.0,
                        help="--sd35m: scorer forwards per rollout-forward time (batching; > 1 is cheaper)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="--sd35m: config overrides")
    args = parser.parse_args(argv)

    default_layout = None
    if args.sd35m:
        costs, counts = sd35m_costs(args.forward_ms, args.score_efficiency, args.sync_s, args.allreduce_s,
                                    args.overrides)
        default_layout = counts.pop("layout")
        print("sd35m iteration (forward counts): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    elif args.from_mlflow:
        if not args.run:
            parser.error("--from-mlflow needs --run RUN_ID")
        costs, default_layout = mlflow_costs(args.from_mlflow, args.run)
    else:
        if None in (args.rollout_s, args.score_s, args.learn_s):
            parser.error("give --rollout-s, --score-s and --learn-s, or --sd35m, or --from-mlflow")
        costs = Costs(args.rollout_s, args.score_s, args.learn_s, args.sync_s, args.chunks, 1, args.allreduce_s,
                      args.groups or args.chunks, args.per_group, args.accum)
    if args.updates:
        costs.updates = args.updates
    if args.allreduce_s is not None:
        costs.allreduce = args.allreduce_s
    print(f"unit costs per iteration: rollout {costs.rollout:.2f}s, score {costs.score:.2f}s, learn "
          f"{costs.learn:.2f}s, sync {costs.sync:.2f}s; {costs.chunks} chunks, {costs.updates} optimizer step(s)\n")

    results = []
    spec = args.layout or (",".join(map(str, default_layout)) if default_layout else "1,1,1")
    if spec.startswith("colocated:"):
        results.append(simulate_colocated(costs, int(spec.split(":")[1])))
    else:
        n, m, w = (int(x) for x in spec.split(","))
        results += [simulate_split(costs, n, m, w, sched, args.cores) for sched in ("serial", "pipelined")]
    print(table(results))
    for r in results:
        print(f"  {r.schedule} {r.layout}: {r.critical}")
    if args.sd35m:
        search = [simulate_split(costs, n, m, w, "pipelined") for n, m, w in layouts(args.gpus)]
        search.sort(key=lambda r: r.iteration)
        print(f"\nEvery split of {args.gpus} GPUs, pipelined, fastest first (top 8), and the colocated layout:\n")
        print(table(search[:8] + [simulate_colocated(costs, args.gpus)]))


if __name__ == "__main__":
    main()
