"""Benchmark: rollout, scoring and learner cost of k-way branching at a fixed number of states (not a test).

    python bench/branching.py                         # small preset, k in 1,2,4,6, 4 groups
    python bench/branching.py --config tiny --ks 1,6 --groups 2 --repeats 3 --mlflow

All k children of a state share ONE mean (ARCHITECTURE.md), so one policy forward (the CFG pair) per state serves
the whole group in the rollout and in the learner: only the DRM scoring grows with k, and the learner's extra work
per child is elementwise (a Gaussian log-prob and the clipped ratio), so its cost should grow far slower than k
(target: k = 6 at most 1.3x k = 1); with `--updates 1,2`, the learner with several optimizer steps per batch at
the same states (target: 2 at most 1.1x 1). In ONE plain process, no Ray: `RolloutWorker.rollout` over `--groups` prompt
groups (the states are groups x branching steps, whatever k), `RewardScorer.score` over every child and final
latent, `learner_batch`, and `train_update` on a DeepSpeed engine (gloo, world size 1) over the same states.

Measured: the least of `--repeats` runs after a warm-up. FLOP-implied: `torch.utils.flop_counter.FlopCounterMode`
over one run of each phase (matmuls, convolutions and attention, forward and backward; elementwise work is not
counted, which is exactly the part that grows with k in the rollout and the learner). The DRM is untrained (scores
only drive advantages; timings do not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, format_table, log_to_mlflow, setup_env  # noqa: E402

setup_env()


def best_of(repeats: int, fn):
    """(least seconds over `repeats` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run(args) -> tuple[str, dict]:
    import torch

    from common import learner_engine, learner_train_cfg, single_process_group, untrained_drm
    from drm_ray.algorithms.rl_batch import learner_batch, scoring_requests, split_scores
    from drm_ray.config import load_config
    from drm_ray.data.prompt_table import encode_prompt_table
    from drm_ray.data.prompts import PromptSampler, load_prompts
    from drm_ray.models.sd3 import model_kwargs
    from drm_ray.workers.learner import train_update
    from drm_ray.workers.rollout import RolloutWorker
    from drm_ray.workers.scorer import RewardScorer

    out = Path(args.out or ROOT / "outputs" / f"bench_branching_{args.config}").resolve()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(1)
    g, s, kw = cfg.grpo, cfg.sampling, model_kwargs(cfg.model, cfg.sampling)
    branch = cfg.branch_steps()
    prompts = load_prompts(cfg.data.prompts, cfg.model.preset)
    table = encode_prompt_table(prompts, s.negative_prompt, cfg.model.preset, kw)
    scorer = RewardScorer(["drm"], table, preset=cfg.model.preset, drm_path=str(untrained_drm(cfg, out / "drm")))
    groups = PromptSampler(len(prompts), cfg.run.seed).next(args.groups)
    states = args.groups * len(branch)
    single_process_group()
    train_cfg = learner_train_cfg(cfg, states)
    engine, transformer, sigmas = learner_engine(cfg, train_cfg)
    lora = cfg.lora_spec()
    per_call = cfg.rollout.groups_per_call
    results = []
    for k in args.ks:
        sampling = cfg.rollout_sampling(k)
        worker = RolloutWorker(cfg.model.preset, kw, lora, table, sampling, g.algo, 1)

        def rollout():  # the driver's chunking: `groups_per_call` groups per call
            return [r for lo in range(0, len(groups), per_call)
                    for r in worker.rollout(groups[lo:lo + per_call], -1)]  # v-1: no LoRA loaded, B = 0

        rollout()  # warm-up
        t_roll, rollouts = best_of(args.repeats, rollout)
        lat, lvl, idx, _ = scoring_requests(rollouts, g.algo, sigmas)
        t_score, scores = best_of(args.repeats, lambda: scorer.score(lat, lvl, idx))
        child, final = split_scores(rollouts, g.algo, scores)
        batch, _ = learner_batch(rollouts, g.algo, child, final, len(branch), g.adv_clip)
        n = batch["states"].shape[0]
        learn = lambda: train_update(engine, transformer, batch, n, 1, table, sigmas, train_cfg)  # noqa: E731
        learn()  # warm-up (first backward at this children count)
        t_learn, _ = best_of(args.repeats, learn)
        results.append(dict(k=k, states=n, children=int(batch["children"].shape[:2].numel()), t_roll=t_roll,
                            t_score=t_score, t_learn=t_learn, f_roll=flops(rollout),
                            f_score=flops(lambda: scorer.score(lat, lvl, idx)), f_learn=flops(learn),
                            mb=sum(v.numel() * v.element_size() for v in batch.values()) / 2**20))
        print(f"[bench] k={k}: rollout {t_roll:.3f}s score {t_score:.3f}s learn {t_learn:.3f}s", flush=True)
    text, metrics = report(args, cfg, results)
    if args.updates:
        extra, more = updates_report(args, cfg, batch, table, sigmas)
        text, metrics = text + "\n\n" + extra, {**metrics, **more}
    return text, metrics


def updates_report(args, cfg, batch: dict, table, sigmas) -> tuple[str, dict]:
    """Learner seconds per iteration at the same states (the last k's batch) with `grpo.updates_per_iter` = each of
    --updates: one engine per setting (its gradient-accumulation count follows the minibatch size), least of
    --repeats after a warm-up. Target: 2 updates cost <= 1.1x one update."""
    from common import learner_engine, learner_train_cfg
    from drm_ray.algorithms.rl_batch import IterationLayout, minibatch_shards
    from drm_ray.config import load_config
    from drm_ray.workers.learner import train_iteration

    n = batch["states"].shape[0]
    times, accum = {}, {}
    for u in args.updates:
        ucfg = load_config(args.config, [*args.overrides, f"grpo.updates_per_iter={u}"])
        train_cfg = learner_train_cfg(ucfg, n)
        accum[u] = train_cfg["grad_accum"]
        engine, transformer, _ = learner_engine(ucfg, train_cfg)
        per_group = len(ucfg.branch_steps()) * (1 if ucfg.grpo.algo == "step_grpo" else ucfg.sampling.k)
        shards, totals = minibatch_shards(batch, IterationLayout(n // per_group, per_group, u, 1, accum[u]))
        step = lambda: train_iteration(engine, transformer, shards[0], totals, 1, table, sigmas,  # noqa: E731
                                       train_cfg)
        step()  # warm-up
        times[u], _ = best_of(args.repeats, step)
        print(f"[bench] updates_per_iter={u}: learn {times[u]:.3f}s", flush=True)
    base = times[args.updates[0]]
    rows = [[u, n, accum[u], times[u], f"{times[u] / base:.2f}x"] for u in args.updates]
    text = format_table(["updates_per_iter", "states", "micro-batches per step", "learn s", "vs first"], rows,
                        f"learner seconds per iteration at equal states; least of {args.repeats}")
    last = args.updates[-1]
    ratio = times[last] / base
    text += (f"\nupdates_per_iter={last} / {args.updates[0]}: {ratio:.2f}x measured (target <= 1.10x: "
             f"{'met' if ratio <= 1.1 else 'NOT met'})")
    return text, {f"branching/learn_s_updates{u}": t for u, t in times.items()} | {"branching/updates_ratio": ratio}


def report(args, cfg, results: list[dict]) -> tuple[str, dict]:
    b = results[0]
    rows, metrics = [], {}
    for r in results:
        rows.append([r["k"], r["states"], r["children"], r["t_roll"], f"{r['t_roll'] / b['t_roll']:.2f}x",
                     f"{r['f_roll'] / b['f_roll']:.3f}x", r["t_score"], f"{r['t_score'] / b['t_score']:.2f}x",
                     f"{r['f_score'] / b['f_score']:.2f}x", r["t_learn"], f"{r['t_learn'] / b['t_learn']:.2f}x",
                     f"{r['f_learn'] / b['f_learn']:.3f}x", f"{r['mb']:.2f}"])
        metrics.update({f"branching/learn_s_k{r['k']}": r["t_learn"], f"branching/rollout_s_k{r['k']}": r["t_roll"],
                        f"branching/score_s_k{r['k']}": r["t_score"]})
    s = cfg.sampling
    title = (f"k-way branching at a fixed number of states; preset {args.config} ({cfg.model.num_layers} blocks x "
             f"{cfg.model.num_attention_heads} heads x {cfg.model.attention_head_dim}, {s.resolution} px, "
             f"{s.num_steps} steps), {args.groups} groups x {len(cfg.branch_steps())} branching steps, CFG "
             f"{s.guidance_scale}, beta {cfg.grpo.beta}; seconds, least of {args.repeats}; ratios vs k = {b['k']}")
    header = ["k", "states", "children", "rollout s", "measured", "FLOP-implied", "score s", "measured",
              "FLOP-implied", "learn s", "measured", "FLOP-implied", "batch MB"]
    text = format_table(header, rows, title)
    last = results[-1]
    verdict = last["t_learn"] / b["t_learn"]
    text += (f"\nlearner k={last['k']} / k={b['k']}: {verdict:.2f}x measured "
             f"(target <= 1.30x: {'met' if verdict <= 1.3 else 'NOT met'})")
    metrics["branching/learn_ratio_kmax"] = verdict
    return text, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--ks", default="1,2,4,6", type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--groups", type=int, default=4, help="prompt groups (states = groups x branching steps)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per phase; the least is reported")
    parser.add_argument("--updates", default=None, type=lambda v: [int(x) for x in v.split(",")],
                        help="also time the learner at the last k's states with grpo.updates_per_iter = each value "
                             "(e.g. 1,2)")
    parser.add_argument("--out", default=None, help="work directory (default outputs/bench_branching_<config>)")
    parser.add_argument("--mlflow", action="store_true", help="log the table to MLflow")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_intermixed_args(argv)
    if min(args.ks) < 1 or args.groups < 1 or args.repeats < 1:
        parser.error("--ks must be >= 1, --groups >= 1, --repeats >= 1")
    text, metrics = run(args)
    print("\n" + text, flush=True)
    out = Path(args.out or ROOT / "outputs" / f"bench_branching_{args.config}").resolve()
    (out / "branching.txt").write_text(text + "\n")
    if args.mlflow:
        log_to_mlflow("branching", out, {"config": args.config, "ks": args.ks, "groups": args.groups}, metrics,
                      text)


if __name__ == "__main__":
    main()
