"""Benchmark: the toy world's ceiling. Can RL raise the oracle when the oracle itself is the reward?

    python bench/ceiling.py                  # pretrain (reused if done) + 2 algorithms x 3 seeds -> docs/CEILING.md
    python bench/ceiling.py --quick          # a smoke run (~5 min) -> <out>/CEILING.md
    python bench/ceiling.py --algos grpo --adv-norms std,mean --lrs 0.002   # one algorithm, a settings grid

docs/REPRODUCTION.md could not decide the paper's RL claim: with a DRM that ranks held-out pairs 60% right, neither
GRPO nor Step-GRPO moved the panel oracle. Before blaming the DRM, this measures the ceiling with the oracle as the
reward (no reward-model error at all), through the real job (`jobs/step_grpo.py --config toy`):

- GRPO, `reward.rewards=[oracle]`: the oracle grades each final image; one terminal reward per trajectory.
- Step-GRPO, `reward.rewards=[oracle]`: every branching child is graded through its denoised estimate
  x0_hat = x_s - s * v (one extra policy forward per child, counted): dense per-step credit from the same reward.
  The difference between the two isolates the algorithm claim (dense step credit vs a terminal reward) from the
  quality of a reward model.

Both at equal rollout compute per iteration (GRPO: k trajectories for each of B/k prompts; Step-GRPO: one for each of
B prompts), the same settings as bench/reproduce.py's RL stage, several seeds; the oracle grades the fixed
180-image evaluation panel (ODE) every few iterations. If GRPO with the oracle cannot raise the panel oracle clearly,
the policy or its training settings are the bottleneck, and no reward model can be judged in this world until that
is fixed. Stages reuse finished runs (`--force` re-runs them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reproduce import FULL, QUICK, Chain  # noqa: E402

ALGOS = ("grpo", "step_grpo")


def name(algo: str, lr: float, norm: str) -> str:
    return f"{algo} lr={lr:g}" + (f" adv_norm={norm}" if norm != "std" else "")


TAG = ""  # "-p<prompts>-i<iterations>" when --set changes the RL budget, so runs of other budgets are kept apart


def run_dir(out: Path, algo: str, lr: float, seed: int, norm: str = "std") -> Path:
    return out / "ceiling" / (f"{algo}-oracle-lr{lr:g}" + (f"-{norm}" if norm != "std" else "") + TAG + f"-s{seed}")


def settings(algos, lrs, norms) -> list[tuple[str, float, str]]:
    return [(a, lr, n) for lr in lrs for n in norms for a in algos]


def caption_file(out: Path, pattern: str) -> Path:
    """The toy captions matching the regular expression `pattern`, one per line, for data.prompts."""
    import re

    from drm_ray.toy.world import caption_texts

    chosen = [t for t in caption_texts() if re.search(pattern, t)]
    if not chosen:
        raise SystemExit(f"[ceiling] --captions {pattern!r} matches no toy caption (see drm_ray.toy.world)")
    path = out / "prompts" / (re.sub(r"[^a-z0-9]+", "_", pattern.lower()).strip("_") + ".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(chosen) + "\n")
    return path


def run_rl(chain: Chain, p: dict, seeds: int, grid: list[tuple[str, float, str]], k: int = 4,
           prompts_file: Path | None = None) -> None:
    data = [f"data.prompts={prompts_file}"] if prompts_file else []
    for seed in range(seeds):
        for algo, lr, norm in grid:
            run = run_dir(chain.out, algo, lr, seed, norm)
            prompts = p["prompts"] // k if algo == "grpo" else p["prompts"]
            chain.run(f"ceiling-{run.name}", [
                "jobs/step_grpo.py", "--config", "toy", "--algo", algo, chain.model, chain.tracking,
                "reward.rewards=[oracle]", f"run.output_dir={run}", f"run.seed={seed}", f"sampling.k={k}",
                f"learner.lr={lr}", f"grpo.adv_norm={norm}", f"grpo.prompts_per_iter={prompts}",
                f"grpo.iterations={p['iterations']}", f"grpo.eval_every={p['eval_every']}",
                f"grpo.checkpoint_every={p['iterations']}", f"tracking.run_name=ceiling-{run.name}", *data],
                run / "summary.json")


def curves(out: Path, seeds: int, grid: list[tuple[str, float, str]]) -> dict:
    """{(algo, lr, norm): curves over the seeds that finished}."""
    result = {}
    for algo, lr, norm in grid:
        runs = [json.loads(f.read_text()) for s in range(seeds)
                if (f := run_dir(out, algo, lr, s, norm) / "summary.json").is_file()]
        if runs:
            result[(algo, lr, norm)] = _curve(runs)
    return result


def _curve(runs: list[dict]) -> dict:
    return dict(
        iters=np.array([e["iteration"] for e in runs[0]["eval"]]),
        oracle=np.array([[e["eval/oracle_score"] for e in r["eval"]] for r in runs]),  # [seeds, evals]
        correct=np.array([[e["eval/oracle_correct"] for e in r["eval"]] for r in runs]),
        policy=np.array([e["policy_forwards"] for e in runs[0]["eval"]]),
        x0=np.array([e.get("x0_forwards", 0) for e in runs[0]["eval"]]))


def ms(v: np.ndarray) -> str:
    return f"{v.mean():.4f} +- {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def final_metric(out: Path, run: Path, key: str) -> float:
    """The last logged value of `key` in a run's MLflow history (NaN when absent)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(json.loads((run / "summary.json").read_text())["mlflow_run_id"], key)
    return max(history, key=lambda m: m.step).value if history else float("nan")


def report(out: Path, p: dict, seeds: int, grid: list, timings: dict, path: Path, quick: bool, cmd: str,
           prompts_file: Path | None = None) -> None:
    c = curves(out, seeds, grid)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    md = [f"# The toy world's ceiling: RL with the oracle as the reward{' (QUICK SMOKE RUN)' if quick else ''}", "",
          f"Written by `python bench/ceiling.py{cmd}` at commit {commit or 'unknown'} on "
          f"{platform.machine()} with {os.cpu_count()} CPU cores, no GPU; every number was measured by that run. "
          "Settings as bench/reproduce.py's RL stage: " + ", ".join(f"{k}={p[k]}" for k in
                                                                   ("iterations", "eval_every", "prompts")) +
          f", k=4, up to {seeds} seed(s) per setting. Panel: 180 ODE images ("
          + (f"the {len(prompts_file.read_text().splitlines())} training captions of {prompts_file.name}, "
             "cycling" if prompts_file else "every caption twice") + ", fixed seeds), graded by the oracle.", ""]
    if not c:
        path.write_text("\n".join(md + ["No run finished.", ""]))
        return
    keys = list(c)
    iters = c[keys[0]]["iters"]
    header = ["iteration", "policy forwards (rollouts)"] + [f"{name(*key)}: oracle (correct)" for key in keys]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j, it in enumerate(iters):
        cells = [str(it), str(c[keys[0]]["policy"][j])]
        cells += [f"{ms(c[key]['oracle'][:, j])} ({100 * c[key]['correct'][:, j].mean():.1f}%)" for key in keys]
        md.append("| " + " | ".join(cells) + " |")
    md += [""]
    verdicts = []
    for (a, lr, norm), cur in c.items():
        gain = cur["oracle"][:, -1] - cur["oracle"][:, 0]  # per seed
        se = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("nan")
        clear = len(gain) > 1 and gain.mean() > 2 * se and gain.mean() > 0.01
        x0 = cur["x0"][-1]
        kl = [final_metric(out, run_dir(out, a, lr, i, norm), "train/kl_ref") for i in range(len(gain))]
        verdicts.append(f"- {name(a, lr, norm)} with the oracle: panel oracle {cur['oracle'][:, 0].mean():.4f} -> "
                        f"{cur['oracle'][:, -1].mean():.4f}, gain {gain.mean():+.4f} +- {se:.4f} (s.e. over "
                        f"{len(gain)} seed(s); per seed {', '.join(f'{g:+.4f}' for g in gain)}): "
                        f"{'CLEAR' if clear else 'NOT CLEAR'} (criterion: gain > 2 s.e. over >= 2 seeds and > 0.01); "
                        f"KL to the reference at the last update {', '.join(f'{v:.2e}' for v in kl)}"
                        + (" -> the policy COLLAPSED (the oracle fell by more than 0.05 while it was the reward; the "
                           "update's direction is tested in tests/test_learner.py, so the likely cause is steps too "
                           "large for the signal in a batch)" if gain.mean() < -0.05 else "")
                        + (" -> the policy BARELY MOVED (KL < 0.01, oracle within 0.01)"
                           if abs(gain.mean()) < 0.01 and np.nanmax(kl) < 0.01 else "")
                        + (f"; x0_hat forwards spent: {x0} (policy forwards for rollouts: {cur['policy'][-1]})"
                           if x0 else ""))
    md += ["## Verdicts", ""] + verdicts + [""]
    md += ["## Timings (wall clock)", "", "| stage | seconds |", "|---|---|"]
    mine = {"pretrain"} | {f"ceiling-{run_dir(out, *key[:2], i, key[2]).name}" for key in c for i in range(seeds)}
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items() if k in mine] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work directory (default outputs/reproduce[_quick], shared "
                                                     "with bench/reproduce.py so the pre-trained model is reused)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny budgets")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per algorithm (default 3; quick 1)")
    parser.add_argument("--lrs", default="0.001", help="comma-separated learner.lr values (default 0.001, the "
                                                        "toy preset's)")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated: grpo, step_grpo")
    parser.add_argument("--adv-norms", default="std", help="comma-separated grpo.adv_norm values: std, mean")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override budget parameters of bench/reproduce.py's FULL / QUICK (prompts, iterations, "
                             "eval_every)")
    parser.add_argument("--captions", default=None, metavar="REGEX",
                        help="train (and build the panel) on the toy captions matching REGEX only, e.g. "
                             "'^a .* square ' for the 25 one-square captions (default: all 90)")
    parser.add_argument("--force", action="store_true", help="re-run finished runs")
    parser.add_argument("--report", default=None, help="default docs/CEILING.md (<out>/CEILING.md with --quick)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in ("prompts", "iterations", "eval_every") or not value:
            parser.error(f"--set {item!r}: expected prompts|iterations|eval_every=INT")
        p[key] = int(value)
    global TAG
    TAG = "".join(f"-{k[0]}{p[k]}" for k in ("prompts", "iterations") if p[k] != (QUICK if args.quick else FULL)[k])
    seeds = args.seeds or (1 if args.quick else 3)
    out = Path(args.out or ROOT / "outputs" / ("reproduce_quick" if args.quick else "reproduce")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chain = Chain(out, p, args.force)
    prompts_file = caption_file(out, args.captions) if args.captions else None
    if prompts_file:
        TAG += "-" + prompts_file.stem
    lrs = [float(v) for v in args.lrs.split(",")]
    grid = settings(args.algos.split(","), lrs, args.adv_norms.split(","))
    chain.pretrain()
    run_rl(chain, p, seeds, grid, prompts_file=prompts_file)
    path = Path(args.report) if args.report else (out / "CEILING.md" if args.quick else ROOT / "docs" / "CEILING.md")
    cmd = "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    report(out, p, seeds, grid, chain.timings, path, args.quick, cmd, prompts_file)
    print(f"[ceiling] report written to {path}", flush=True)


if __name__ == "__main__":
    main()
