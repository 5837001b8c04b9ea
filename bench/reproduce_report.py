"""The report of bench/reproduce.py: reads every stage's outputs, writes REPRODUCTION.md with tables and plots, and
logs the numbers, plots and report to one MLflow run ("reproduce", experiment drm-ray-bench) in <out>/mlflow.db.

Verdicts are computed from the numbers with the criteria printed beside them, so a re-run cannot keep a stale claim.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

import numpy as np

TIMESTEPS = (0, 250, 500, 750, 950)


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} +- {v.std(ddof=1):.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def first_reach(iters: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The first iteration at which the curve reaches `target`, linearly interpolated between evaluations."""
    for j in range(len(values)):
        if values[j] >= target:
            if j == 0:
                return float(iters[0])
            f = (target - values[j - 1]) / (values[j] - values[j - 1])
            return float(iters[j - 1] + f * (iters[j] - iters[j - 1]))
    return None


def speedup_verdict(ratio: float | None, final: float, target: float) -> str:
    """The paper's measure: Step-GRPO reaches GRPO's final value in >= 1.5x fewer iterations, or policy forwards
    (`ratio`, GRPO's over Step-GRPO's), and is still there at its own end (`final` >= `target`)."""
    return "HELD" if ratio and ratio >= 1.5 and final >= target else "DID NOT HOLD"


# ---------------------------------------------------------------------------------------------- sections


def _pair_correct(evals: list[list[dict]]) -> np.ndarray | None:
    """[seeds, t, pairs] 1 where a DRM ranks a held-out pair right, from the margins eval_drm.py writes (None when an
    eval.json predates them or the pair counts differ)."""
    if not evals or any("margins" not in r or len(r["margins"]) != len(evals[0][0].get("margins", ()))
                        for rows in evals for r in rows):
        return None
    return np.array([[np.asarray(r["margins"]) > 0 for r in rows] for rows in evals], dtype=float)


def drm_section(out: Path, p: dict, metrics: dict) -> tuple[str, dict]:
    """Accuracy vs t of the pretrained- and random-init DRMs, and the verdicts on them. Both inits are scored on the
    same held-out pairs with the same noise, so a difference between them, or between two t, is judged against the
    paired standard error: the spread over pairs of each pair's own difference (falling back to two independent
    binomial errors when the eval files carry no per-pair margins)."""
    evals = {init: [] for init in ("pretrained", "random")}
    for init in evals:
        for seed in range(p["drm_seeds"]):
            rows = _load(out / "drm" / f"{init}-s{seed}" / "eval.json")
            if rows:
                evals[init].append([r for r in rows if r["t"] in TIMESTEPS])
    if not evals["pretrained"] or not evals["random"]:
        return "DRM stage not run.\n", {}
    acc = {init: [{r["t"]: r["accuracy"] for r in rows} for rows in evals[init]] for init in evals}
    n_pairs = evals["pretrained"][0][0]["pairs"]
    rows = []
    for t in TIMESTEPS:
        pre, rnd = [a[t] for a in acc["pretrained"]], [a[t] for a in acc["random"]]
        rows.append([t, _ms(pre), _ms(rnd), f"{np.mean(pre) - np.mean(rnd):+.3f}"])
        metrics[f"drm/accuracy_pretrained_t{t}"] = float(np.mean(pre))
        metrics[f"drm/accuracy_random_t{t}"] = float(np.mean(rnd))
    mean = {init: np.mean([[a[t] for t in TIMESTEPS] for a in acc[init]], axis=0) for init in acc}
    gap = float((mean["pretrained"] - mean["random"]).mean())
    se_one = 0.5 / np.sqrt(n_pairs)  # binomial s.e. at 50% accuracy: the noise of one accuracy figure
    correct = {init: _pair_correct(evals[init]) for init in evals}
    if all(c is not None and c.shape[1:] == (len(TIMESTEPS), n_pairs) for c in correct.values()):
        per_pair = lambda d: float(d.std(ddof=1) / np.sqrt(len(d)))  # noqa: E731
        se_gap = per_pair(correct["pretrained"].mean((0, 1)) - correct["random"].mean((0, 1)))
        se_t = per_pair(correct["pretrained"][:, 0].mean(0) - correct["pretrained"][:, -1].mean(0))
        how = f"paired over the {n_pairs} held-out pairs"
    else:
        se_gap = se_t = float(np.sqrt(2) * se_one)
        how = "of a difference of two independent accuracies"
    metrics["drm/init_gap"], metrics["drm/init_gap_se"] = gap, se_gap
    pre = mean["pretrained"]
    bar = {0: 0.75, 750: 0.65}  # the bar, from the paper's HPDv3 figures (74.0 at t=0, 65.1 at t=750)
    met = {t: float(pre[TIMESTEPS.index(t)]) >= b for t, b in bar.items()}
    init_held = gap > 2 * se_gap
    seeds = len(acc["pretrained"])
    verdict = {
        "bar": ("MET" if all(met.values()) and init_held else "NOT MET") + (
            f": pretrained-init held-out accuracy {pre[0]:.3f} at t=0 (bar 0.75) and {pre[TIMESTEPS.index(750)]:.3f} "
            f"at t=750 (bar 0.65), {gap:+.3f} over random init (bar: > 2 s.e. = {2 * se_gap:.3f})"),
        "init": ("HELD" if init_held else "DID NOT HOLD") + f": pretrained-init minus random-init accuracy, "
                f"averaged over t, is {gap:+.3f} (criterion: > 2 s.e. {how} = {2 * se_gap:.3f}"
                + (f"; {seeds} DRM seed per init, so training-seed noise is not in this s.e." if seeds == 1 else "")
                + ")",
        "t": ("HELD" if pre[0] > pre[-1] + 2 * se_t and pre[2] > 0.5 + 2 * se_one else "DID NOT HOLD") +
             f": pretrained-init accuracy is {pre[0]:.3f} at t=0, {pre[2]:.3f} at t=500 and {pre[-1]:.3f} at t=950 "
             f"(criterion: t=0 above t=950 by > 2 s.e. {how} = {2 * se_t:.3f}, and t=500 above chance by > 2 "
             f"binomial s.e. = {2 * se_one:.3f})",
    }
    text = (f"Held-out accuracy on {n_pairs} oracle-labelled pairs (mean +- sd over {seeds} "
            f"DRM seed(s); both inits see the same data, steps and seeds, and are scored on the same noisy pairs"
            + (f"; only the last {p['drm_train_blocks']} kept block(s) and the head learn (drm.train_blocks), the "
               "embedders and earlier blocks keep their initial weights" if p.get("drm_train_blocks", -1) >= 0 else "")
            + "):\n\n"
            + _table(["t", "pretrained init", "random init", "difference"], rows) + "\n")
    return text, {"acc": acc, "verdict": verdict, "mean": mean}


def rl_run(out: Path, algo: str, reward: str, seed: int) -> Path:
    """The directory of one RL run of bench/reproduce.py (`Chain.rl_dir`)."""
    return out / "rl" / (f"{algo}-s{seed}" if reward == "drm" else f"{algo}-{reward}-s{seed}")


def ceiling_run(out: Path, groups: int, seed: int, reward: str = "oracle") -> Path:
    """The directory of one run of bench/reproduce.py's ceiling stage (`Chain.ceiling_dir`)."""
    return out / "ceiling_scale" / f"grpo-{reward}-g{groups}-s{seed}"


def ceiling_lr(p: dict, groups: int) -> float:
    """The learning rate of the ceiling stage's runs at `groups` groups: the entry of `ceiling_lrs` beside it in
    `ceiling_groups` (the rl stage's `rl_lr` for a batch not listed there, and for parameters written before
    `ceiling_lrs` existed)."""
    lrs = p.get("ceiling_lrs") or [p["rl_lr"]] * len(p["ceiling_groups"])
    return float(dict(zip(p["ceiling_groups"], lrs)).get(groups, p["rl_lr"]))


def _se(v: np.ndarray) -> float:
    """Standard error of the mean over seeds (nan for one seed)."""
    return v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")


def gain_text(v: np.ndarray) -> tuple[str, bool]:
    """Per-seed oracle gains [seeds] -> ("mean +- s.e. ...: CLEAR / NOT CLEAR", clear): clear when the mean exceeds
    two standard errors over at least two seeds."""
    se = _se(v)
    ok = bool(len(v) > 1 and v.mean() > 2 * se)
    se_text = f"{se:.4f}" if len(v) > 1 else "n/a"
    return (f"{v.mean():+.4f} +- {se_text} s.e. over {len(v)} seed(s) (per seed {', '.join(f'{x:+.4f}' for x in v)}): "
            + ("CLEAR" if ok else "NOT CLEAR") + " (criterion: > 2 s.e.)"), ok


def direction(v: np.ndarray) -> str:
    """Per-seed gains [seeds] -> "rose" / "fell" (the mean beyond two standard errors over >= 2 seeds) / "unclear"."""
    if gain_text(v)[1]:
        return "rose"
    return "fell" if len(v) > 1 and v.mean() < -2 * _se(v) else "unclear"


ALGO_NAMES = {"grpo": "GRPO", "step_grpo": "Step-GRPO"}
MOVED = {"rose": "a clear rise", "fell": "a clear fall", "unclear": "not clear: within 2 s.e. over seeds"}


def drm_reading(acc0: float, proxy: dict[str, float], gains: dict[str, np.ndarray],
                larger: dict[int, np.ndarray] | None = None) -> str:
    """What the runs optimizing the DRM say, from their numbers: `proxy` the change of the DRM's panel score (seed
    mean), `gains` the per-seed changes of the panel oracle, per algorithm; `larger` the per-seed oracle gains of
    GRPO with the DRM at larger batches (groups -> gains; section c'')."""
    moved = {a: direction(v) for a, v in gains.items()}
    text = (f"Reading: the pre-trained-init DRMs (RL and Step-wise Sampling use the first) rank held-out oracle pairs "
            f"right {100 * acc0:.0f}% of the time at t=0 (mean over seeds; 50% is chance). " + "; ".join(
                f"{ALGO_NAMES[a]} moved the DRM's score of the panel by {proxy[a]:+.3f} and its oracle by "
                f"{gains[a].mean():+.4f} ({MOVED[moved[a]]})" for a in gains) + ".")
    hacked = [ALGO_NAMES[a] for a in gains if proxy[a] > 0 and moved[a] != "rose"]
    if hacked:
        text += (f" Where the proxy rises and the truth does not clearly rise ({' and '.join(hacked)}), the proxy's "
                 "gain is mostly the reward model's error being optimized, not better images.")
    risen = [ALGO_NAMES[a] for a in gains if moved[a] == "rose"]
    if risen:
        text += f" {' and '.join(risen)} raised the oracle clearly: there the DRM's ranking carried to the truth."
    for g, v in sorted((larger or {}).items()):
        if direction(v) == "rose":
            text += (f" GRPO with the same DRM at {g} groups ({4 * g} trajectories / iteration) did raise the oracle "
                     f"clearly ({gain_text(v)[0].split(' (')[0]}): the DRM's ranking carries to the truth when the "
                     "policy gradient is not dominated by noise, so a flat oracle at the smaller batch is not the "
                     "DRM's error alone.")
    return text


def oracle_reading(gains: dict[str, np.ndarray], x0_forwards: int, rollout_forwards: int) -> str:
    """What the runs optimizing the oracle itself say about dense step credit, from their per-seed oracle gains."""
    moved = {a: direction(v) for a, v in gains.items()}
    step, grpo = moved["step_grpo"] == "rose", moved["grpo"] == "rose"
    finding = ("per-step credit from the same reward moved the policy where one terminal reward per trajectory did "
               "not" if step and not grpo else
               "both moved the policy (how fast, against each other, is the verdict above)" if step and grpo else
               "one terminal reward per trajectory moved the policy where per-step credit did not" if grpo else
               "neither moved the policy clearly at this budget")
    return (f"With the oracle itself as the reward (no reward-model error), GRPO's panel oracle gain was "
            f"{gain_text(gains['grpo'])[0].split(' (')[0]} and Step-GRPO's {gain_text(gains['step_grpo'])[0].split(' (')[0]}"
            f" (s.e. over seeds): {finding}. Step-GRPO paid {x0_forwards} policy forwards for the children's x0_hat "
            f"on top of {rollout_forwards} for the rollouts ({x0_forwards / max(rollout_forwards, 1):.1f}x), the "
            "cost the DRM exists to avoid.")


def ceiling_curves(out: Path, p: dict, groups: int, reward: str = "oracle") -> dict | None:
    """The ceiling stage's curves at one batch and reward (over the seeds that finished), or None."""
    return _run_curves([ceiling_run(out, groups, seed, reward) for seed in range(p["ceiling_seeds"])],
                       "eval/drm_score")


def _run_curves(runs: list[Path], drm_key: str) -> dict | None:
    """Evaluation curves [seeds, evals] of the runs whose summary.json exists, cut to the evaluations every one of
    them reached; None if none finished. `drm`: the DRM's panel score under `drm_key`, when logged."""
    ev = [r["eval"] for r in (_load(run / "summary.json") for run in runs) if r]
    if not ev:
        return None
    n = min(len(e) for e in ev)
    ev = [e[:n] for e in ev]
    first = ev[0]
    return dict(iters=np.array([e["iteration"] for e in first]),
                oracle=np.array([[e["eval/oracle_score"] for e in r] for r in ev]),
                correct=np.array([[e["eval/oracle_correct"] for e in r] for r in ev]),
                drm=(np.array([[e[drm_key] for e in r] for r in ev]) if drm_key in first[0] else None),
                forwards=np.array([e["policy_forwards"] for e in first]),
                drm_forwards=np.array([e.get("drm_forwards", 0) for e in first]),
                x0_forwards=np.array([e.get("x0_forwards", 0) for e in first]))


def ceiling_drm_part(out: Path, p: dict, metrics: dict) -> tuple[str, str | None]:
    """The ceiling's GRPO (one x_1 per group, SDE on the first step) with the DRM as its reward, beside Step-GRPO
    with the DRM (section c) at equal rollout compute: the paper's claim measured against a GRPO that can move.
    Returns (markdown, verdict or None when the runs are missing)."""
    equal = p["prompts"] // 4  # GRPO groups at the rl stage's rollout compute (k = 4)
    c = ceiling_curves(out, p, equal, "drm") if equal in p.get("ceiling_drm_groups", ()) else None
    step = algo_curves(out, p, "step_grpo", "drm")
    if c is None or step is None:
        return "", None
    s_at = {int(it): j for j, it in enumerate(step["iters"])}
    rows = []
    for j, it in enumerate(c["iters"]):
        k = s_at.get(int(it))
        rows.append([it, _ms(c["oracle"][:, j]), _ms(step["oracle"][:, k]) if k is not None else "n/a",
                     (f"{c['drm'][:, j].mean():+.3f} / " if c["drm"] is not None else "n/a / ")
                     + (f"{step['drm'][:, k].mean():+.3f}" if k is not None and step["drm"] is not None else "n/a")])
    text = (f"\nThe same GRPO with the DRM as its reward ({4 * equal} trajectories / iteration, learning rate "
            f"{ceiling_lr(p, equal):g}, {len(c['oracle'])} seed(s)) beside Step-GRPO with the DRM (section (c), the "
            "same rollout compute per iteration):\n\n")
    text += _table(["iteration", "panel oracle, GRPO (DRM reward)", "panel oracle, Step-GRPO (DRM reward)",
                    "DRM score (GRPO / Step)"], rows) + "\n\n"
    gain, ok = gain_text(c["oracle"][:, -1] - c["oracle"][:, 0])
    mean, s_mean = c["oracle"].mean(0), step["oracle"].mean(0)
    target, start = float(mean[-1]), float(mean[0])
    metrics["ceiling/grpo_drm_oracle_gain"] = target - start
    text += f"- GRPO with the DRM: panel oracle gain {gain}"
    if c["drm"] is not None:
        text += f"; its DRM score {c['drm'][:, 0].mean():+.3f} -> {c['drm'][:, -1].mean():+.3f}"
    text += ".\n"
    if not ok:
        return text, (f"UNDECIDED: this GRPO with the DRM as its reward did not clearly raise the panel oracle "
                      f"either (gain {gain}), so 'iterations to reach GRPO's final' is not defined here")
    reach_s = first_reach(step["iters"], s_mean, target)
    reach_g = first_reach(c["iters"], mean, target)
    ratio = reach_g / reach_s if reach_s else None
    if ratio:
        metrics["ceiling/iteration_ratio_drm"] = ratio
    return text, (speedup_verdict(ratio, s_mean[-1], target) + (
        f": at equal rollout compute ({4 * equal} trajectories per iteration), Step-GRPO with the DRM reaches this "
        f"GRPO's final panel oracle ({target:.4f}, from {start:.4f}) at iteration "
        + (f"{reach_s:.1f}" if reach_s else "never") + f" vs GRPO's {reach_g:.1f} (ratio "
        + (f"{ratio:.1f}x" if ratio else "n/a") + f"; criterion: >= 1.5x and still there at the end; Step-GRPO "
        f"ends at {s_mean[-1]:.4f}; the paper reports 2.5x)"))


def ceiling_drm_scale_part(out: Path, p: dict, metrics: dict) -> tuple[str, list[str], dict[int, np.ndarray]]:
    """The ceiling's GRPO with the DRM as its reward at the batches of `ceiling_drm_groups` larger than the rl
    stage's, against Step-GRPO with the DRM (section c) in policy forwards: the paper's claim against a GRPO batch
    that can move the oracle. Returns (markdown, verdicts, groups -> per-seed oracle gains; all empty when no such
    runs finished)."""
    equal = p["prompts"] // 4
    step = algo_curves(out, p, "step_grpo", "drm")
    text, verdicts, gains = "", [], {}
    for g in sorted(g for g in p.get("ceiling_drm_groups", ()) if g != equal):
        c = ceiling_curves(out, p, g, "drm")
        if c is None or step is None:
            continue
        rows = [[it, _ms(c["oracle"][:, j]), f"{c['drm'][:, j].mean():+.3f}" if c["drm"] is not None else "n/a"]
                for j, it in enumerate(c["iters"])]
        text += (f"\nThe same GRPO with the DRM as its reward at {g} groups ({4 * g} trajectories / iteration, learning "
                 f"rate {ceiling_lr(p, g):g}, {len(c['oracle'])} seed(s), {c['forwards'][-1]:,} rollout policy "
                 "forwards over the run):\n\n" + _table(["iteration", "panel oracle", "DRM score"], rows) + "\n\n")
        gains[g] = c["oracle"][:, -1] - c["oracle"][:, 0]
        gain, ok = gain_text(gains[g])
        metrics[f"ceiling/grpo_drm_g{g}_oracle_gain"] = float(gains[g].mean())
        text += f"- GRPO with the DRM at {g} groups: panel oracle gain {gain}.\n"
        if not ok:
            verdicts.append(f"UNDECIDED: GRPO with the DRM at {g} groups did not clearly raise the panel oracle "
                            f"either (gain {gain})")
            continue
        bullet, verdict = forwards_claim(step, c, g, "Step-GRPO with the DRM", "(c)", p["prompts"], metrics,
                                         f"ceiling/grpo_drm_g{g}_forwards_ratio")
        text += bullet
        verdicts.append(verdict)
    return text, verdicts, gains


def forwards_claim(step: dict, c: dict, g: int, who: str, section: str, trajectories: int, metrics: dict,
                   key: str) -> tuple[str, str]:
    """Step-GRPO (`step`'s curves, `who`) against the `g`-group GRPO `c` in policy forwards: how many it spends,
    x0_hat forwards included, to reach that GRPO's final panel oracle, vs that GRPO's rollout forwards over its run.
    Returns (a bullet for the section, the verdict: >= 1.5x fewer and still there at the end)."""
    s_mean = step["oracle"].mean(0)
    target, start = float(c["oracle"][:, -1].mean()), float(c["oracle"][:, 0].mean())
    reach = first_reach(step["iters"], s_mean, target)
    if not reach:
        return (f"- {who} (section {section}) does not reach the {g}-group GRPO's final panel oracle {target:.4f} "
                f"within its {step['iters'][-1]} iterations.\n",
                f"DID NOT HOLD: {who} does not reach the final panel oracle ({target:.4f}) of the GRPO that has {g} "
                f"groups within its {step['iters'][-1]} iterations")
    spent = reach * (step["forwards"][-1] + step["x0_forwards"][-1]) / max(1, step["iters"][-1])
    grpo = c["forwards"][-1]
    metrics[key] = grpo / spent
    counted = "counting its x0_hat forwards" if step["x0_forwards"][-1] else "none of them for x0_hat"
    bullet = (f"- {who} (section {section}, {trajectories} trajectories / iteration, seed mean) reaches the {g}-group "
              f"GRPO's final panel oracle {target:.4f} at iteration {reach:.1f}: about {spent:,.0f} policy forwards "
              f"{counted}, vs {grpo:,} rollout forwards for this GRPO ({grpo / spent:.1f}x).\n")
    verdict = speedup_verdict(grpo / spent, s_mean[-1], target) + (
        f": against the GRPO that has {g} groups ({4 * g} trajectories per iteration), {who} reaches that GRPO's final "
        f"panel oracle ({target:.4f}, from {start:.4f}) after about {spent:,.0f} policy forwards, "
        + ("x0_hat forwards included" if step["x0_forwards"][-1] else "it needs none for x0_hat")
        + f", vs this GRPO's {grpo:,} ({grpo / spent:.1f}x fewer; the same criterion in policy forwards instead of "
        f"iterations: >= 1.5x and still there at the end, where Step-GRPO is at {s_mean[-1]:.4f}"
        + (", below it" if s_mean[-1] < target else "") + ")")
    return bullet, verdict


def ceiling_section(out: Path, p: dict, metrics: dict) -> tuple[str, dict]:
    """GRPO with the oracle, one x_1 per group and SDE on the first step, at the rl stage's batch and a larger one:
    does the panel oracle rise at all, and how fast does Step-GRPO (section c') reach where this GRPO ends?"""
    curves = {g: c for g in p.get("ceiling_groups", ()) if (c := ceiling_curves(out, p, g)) is not None}
    if not curves:
        return "Ceiling stage not run.\n", {}
    step = algo_curves(out, p, "step_grpo", "oracle")
    equal = p["prompts"] // 4  # GRPO groups at the rl stage's rollout compute (k = 4)
    text = (f"GRPO with the oracle as its reward, each group's k=4 trajectories from one initial noise x_1 "
            f"(`grpo.shared_initial_noise=true`, DanceGRPO's setting) and SDE and training on step(s) "
            f"{p['ceiling_branch_steps']} only (`grpo.branch_steps`; ODE elsewhere), so the rewards within a group "
            f"differ only by what the trained step drew; the same 180-image panel, "
            f"{max(len(c['oracle']) for c in curves.values())} seed(s).\n\n")
    gs = sorted(curves)
    n = min(len(curves[g]["iters"]) for g in gs)
    iters = curves[gs[0]]["iters"][:n]
    text += _table(["iteration"] + [f"panel oracle, {g} groups ({4 * g} trajectories / it., lr {ceiling_lr(p, g):g})"
                                  for g in gs],
                   [[it] + [_ms(curves[g]["oracle"][:, j]) for g in gs] for j, it in enumerate(iters)]) + "\n\n"
    clear, ok, extra = {}, {}, {}
    for g in gs:
        c = curves[g]
        clear[g], ok[g] = gain_text(c["oracle"][:, -1] - c["oracle"][:, 0])
        mean = c["oracle"].mean(0)
        peak = int(np.argmax(mean))
        metrics[f"ceiling/g{g}_oracle_gain"] = float(mean[-1] - mean[0])
        rates = [r for r in (panel_extra_objects(out, ceiling_run(out, g, seed)) for seed in range(len(c["oracle"])))
                 if r is not None]
        extra[g] = (f"; panel extra objects {100 * np.mean([r[0] for r in rates]):.1f}% -> "
                    f"{100 * np.mean([r[1] for r in rates]):.1f}%" if rates else "")
        text += (f"- {g} groups ({4 * g} trajectories / iteration, learning rate {ceiling_lr(p, g):g}, "
                 f"{c['forwards'][-1]:,} rollout policy forwards over the run): gain {clear[g]}; seed-mean peak "
                 f"{mean[peak]:.4f} at iteration {c['iters'][peak]}{extra[g]}.\n")
    verdict, compute_verdicts = None, []
    if step is not None:
        s_mean = step["oracle"].mean(0)
        per_it = (step["forwards"][-1] + step["x0_forwards"][-1]) / max(1, step["iters"][-1])
        for g in gs:
            c = curves[g]
            target, start = float(c["oracle"][:, -1].mean()), float(c["oracle"][:, 0].mean())
            if not ok[g]:
                continue
            reach_s = first_reach(step["iters"], s_mean, target)
            reach_g = first_reach(c["iters"], c["oracle"].mean(0), target)
            if g == equal:  # equal rollout compute per iteration: the paper's measure, iterations to GRPO's final
                ratio = reach_g / reach_s if reach_s else None
                verdict = speedup_verdict(ratio, s_mean[-1], target) + (
                    f": at equal rollout compute ({4 * g} trajectories per iteration), Step-GRPO with the oracle on "
                    f"x0_hat reaches this GRPO's final panel oracle ({target:.4f}, from {start:.4f}) at iteration "
                    + (f"{reach_s:.1f}" if reach_s else "never") + f" vs GRPO's {reach_g:.1f} (ratio "
                    + (f"{ratio:.1f}x" if ratio else "n/a") + "; criterion: >= 1.5x and still there at the end; "
                    "the paper reports 2.5x)" + (
                        f". Counting Step-GRPO's x0_hat forwards (the oracle grades each child through one; a DRM "
                        f"scores the noisy child itself), it spent about {reach_s * per_it:,.0f} policy forwards to "
                        f"get there vs GRPO's {c['forwards'][-1]:,}" if reach_s else ""))
                if ratio:
                    metrics["ceiling/iteration_ratio"] = ratio
            else:
                bullet, v = forwards_claim(step, c, g, "Step-GRPO with the oracle on x0_hat", "(c')", p["prompts"],
                                           metrics, f"ceiling/g{g}_forwards_ratio")
                text += bullet
                compute_verdicts.append(v)
    if verdict:
        text += f"\nThe algorithm claim against this GRPO: {verdict}.\n"
    drm_text, drm_verdict = ceiling_drm_part(out, p, metrics)
    if drm_verdict:
        text += drm_text + f"\nThe DRM claim against this GRPO: {drm_verdict}.\n"
    scale_text, drm_compute_verdicts, drm_scale_gains = ceiling_drm_scale_part(out, p, metrics)
    text += scale_text
    return text, {"clear": clear, "ok": ok, "verdict": verdict, "groups": gs, "drm_verdict": drm_verdict,
                  "compute_verdicts": compute_verdicts, "drm_compute_verdicts": drm_compute_verdicts,
                  "drm_scale_gains": drm_scale_gains}


def rl_curves(out: Path, p: dict, reward: str) -> dict:
    """{algo: curves over the seeds that finished} of the runs optimizing `reward` (empty if either algo has none)."""
    curves = {algo: algo_curves(out, p, algo, reward) for algo in ("grpo", "step_grpo")}
    return curves if all(c is not None for c in curves.values()) else {}


def algo_curves(out: Path, p: dict, algo: str, reward: str) -> dict | None:
    """The rl stage's curves of one algorithm optimizing `reward`, over the seeds that finished; None if none did."""
    return _run_curves([rl_run(out, algo, reward, seed) for seed in range(p["rl_seeds"])],
                       "eval/drm_score" if reward == "drm" else "eval/judge/drm")


def _panels(out: Path, run: Path, which: str = "ends", size: int = 32) -> list[tuple[dict, np.ndarray, list]] | None:
    """The evaluation panels a run logged to MLflow, read back from their PNGs: [(eval history row, tiles
    [N, H, W, 3] in [0, 1], captions)] for the first and last evaluation (`which="ends"`) or every one ("all").
    The toy panel is every caption in order, cycling; None when the run has no panels, or the recomputed oracle
    grade of a panel is not the logged one (then the captions are not the ones assumed)."""
    import tempfile

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from drm_ray.rl_setup import grid_tiles
    from drm_ray.toy.oracle import oracle_scores
    from drm_ray.toy.world import caption_texts

    summary = _load(run / "summary.json")
    if not summary or not summary.get("eval") or not (out / "mlflow.db").is_file():
        return None
    client, texts, panels = MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), caption_texts(), []
    try:
        params = client.get_run(summary["mlflow_run_id"]).data.params
    except Exception:  # noqa: BLE001 - not a run of this store: nothing to read back
        return None
    if params.get("data.eval_prompts", "None") != "None":  # a panel of other prompts than the captions in order
        return None
    n = int(params["grpo.eval_panel_size"])
    caps = [texts[j % len(texts)] for j in range(n)]
    for ev in (summary["eval"][0], summary["eval"][-1]) if which == "ends" else summary["eval"]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                png = client.download_artifacts(summary["mlflow_run_id"], f"panel/iter_{ev['iteration']:06d}.png", tmp)
            except Exception:  # noqa: BLE001 - no panel logged: nothing to report
                return None
            grid = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
        tiles = grid_tiles(grid, n, size)
        if abs(float(oracle_scores(tiles, caps).score.mean()) - ev["eval/oracle_score"]) > 0.01:
            return None
        panels.append((ev, tiles, caps))
    return panels


def panel_extra_objects(out: Path, run: Path, size: int = 32) -> tuple[float, float] | None:
    """The share of the first and of the last evaluation panel's images that show an extra object
    (drm_ray.toy.oracle.has_extra_object), read back from the panel PNGs the run logged to MLflow; None as
    `_panels`."""
    from drm_ray.toy.oracle import has_extra_object

    panels = _panels(out, run, "ends", size)
    if panels is None:
        return None
    return tuple(float(has_extra_object(tiles, caps).mean()) for _, tiles, caps in panels)


def panel_overoptimization(out: Path, run: Path) -> list[tuple[int, float, float]] | None:
    """The evaluations at which the driver's over-optimization flag holds with the oracle as the judge, recomputed
    from the logged panels: [(iteration, the oracle's mean change image by image since the first panel, its
    standard error)] where the optimized reward's panel mean rose by more than 2 standard errors of the first
    panel (runs before per-image panels were kept log only means: unpaired, conservative) and the oracle fell by
    more than 2 standard errors of its paired change. None as `_panels`."""
    from drm_ray.toy.oracle import oracle_scores

    panels = _panels(out, run, "all")
    if panels is None:
        return None
    first_ev, first_tiles, caps = panels[0]
    base = oracle_scores(first_tiles, caps).score
    flagged = []
    for ev, tiles, _ in panels[1:]:
        d = oracle_scores(tiles, caps).score - base
        change, se = float(d.mean()), float(d.std(ddof=1) / len(d) ** 0.5)
        rose = ev["eval/reward"] - first_ev["eval/reward"] > 2 * first_ev["eval/reward_sem"]
        if rose and change < -2 * se:
            flagged.append((ev["iteration"], change, se))
    return flagged


def overoptimization_text(out: Path, p: dict, reward: str, metrics: dict) -> str:
    """Where the driver's over-optimization flag, with the oracle as the judge, held in the rl stage's runs that
    optimize a learned reward (`panel_overoptimization`); empty for the oracle's own runs."""
    if reward == "oracle":
        return ""
    parts = []
    for algo, label in (("grpo", "GRPO"), ("step_grpo", "Step-GRPO")):
        found = {seed: panel_overoptimization(out, rl_run(out, algo, reward, seed)) for seed in range(p["rl_seeds"])}
        found = {seed: f for seed, f in found.items() if f is not None}
        if not found:
            return ""
        hits = [f"seed {seed} at iteration(s) " + ", ".join(f"{it} (oracle {d:+.4f} +- {se:.4f})" for it, d, se in f)
                for seed, f in found.items() if f]
        metrics[f"rl/{algo}_overopt_seeds"] = float(sum(bool(f) for f in found.values()))
        parts.append(f"{label} {'; '.join(hits) if hits else 'never'} (of {len(found)} seed(s))")
    return ("\nThe driver's over-optimization flag with the oracle as the judge (the panel's optimized reward up by "
            "more than 2 s.e. of the first panel, and the oracle down image by image by more than 2 s.e. of its "
            "paired change, against the first panel; recomputed from the panels logged to MLflow): "
            + "; ".join(parts) + ".\n")


REWARD_NAMES = {"drm": "the DRM", "oracle": "the oracle (Step-GRPO: on each child's x0_hat)"}


def rl_section(out: Path, p: dict, metrics: dict, reward: str = "drm") -> tuple[str, dict]:
    curves = rl_curves(out, p, reward)
    if not curves:
        return f"RL runs with {REWARD_NAMES.get(reward, reward)} not run.\n", {}
    g, s = curves["grpo"], curves["step_grpo"]
    has_drm = g["drm"] is not None and s["drm"] is not None
    rows = []
    for j, it in enumerate(g["iters"]):
        row = [it, g["forwards"][j], _ms(g["oracle"][:, j]), _ms(s["oracle"][:, j]),
               f"{100 * g['correct'][:, j].mean():.1f}% / {100 * s['correct'][:, j].mean():.1f}%"]
        if has_drm:
            row.append(f"{g['drm'][:, j].mean():+.3f} / {s['drm'][:, j].mean():+.3f}")
        rows.append(row)
    target = float(g["oracle"][:, -1].mean())
    start = float(g["oracle"][:, 0].mean())
    reach = {a: first_reach(c["iters"], c["oracle"].mean(0), target) for a, c in curves.items()}
    ratio = reach["grpo"] / reach["step_grpo"] if reach["step_grpo"] and target > start else None
    per_seed = []
    for i in range(min(len(g["oracle"]), len(s["oracle"]))):
        tg = float(g["oracle"][i, -1])
        rg, rs = first_reach(g["iters"], g["oracle"][i], tg), first_reach(s["iters"], s["oracle"][i], tg)
        per_seed.append(rg / rs if rs and tg > g["oracle"][i, 0] else None)
    gain = {a: c["oracle"][:, -1] - c["oracle"][:, 0] for a, c in curves.items()}  # per seed
    tag = "" if reward == "drm" else f"_{reward}"
    metrics.update({f"rl/grpo{tag}_final_oracle": target,
                    f"rl/step_grpo{tag}_final_oracle": float(s["oracle"][:, -1].mean()),
                    "rl/initial_oracle": start})
    if ratio:
        metrics[f"rl/iteration_ratio{tag}"] = ratio
    fmt = (lambda v: "n/a" if v is None else f"{v:.1f}")
    clear, is_clear = {}, {}
    for a, v in gain.items():
        clear[a], is_clear[a] = gain_text(v)
    s_mean = s["oracle"].mean(0)
    peak = int(np.argmax(s_mean))
    step_summary = (f"Step-GRPO's panel oracle {s_mean[0]:.4f} -> {s_mean[-1]:.4f} (gain {clear['step_grpo']}; its "
                    f"peak {s_mean[peak]:.4f} at iteration {s['iters'][peak]})")
    if not is_clear["grpo"]:
        verdict = (f"UNDECIDED by the paper's measure: GRPO did not clearly raise the panel oracle (gain "
                   f"{clear['grpo']}), so 'iterations to reach GRPO's final reward' is not defined. At equal rollout "
                   f"compute, {step_summary}")
    else:
        verdict = speedup_verdict(ratio, s_mean[-1], target) + (
            f": Step-GRPO reaches GRPO's final panel oracle ({target:.4f}, from {start:.4f}) at iteration "
            f"{fmt(reach['step_grpo'])} vs GRPO's "
            f"{fmt(reach['grpo'])} (ratio {fmt(ratio)}x on the seed-mean curves; per seed, against that seed's "
            f"GRPO: {', '.join(fmt(r) for r in per_seed)}; criterion: >= 1.5x and still there at the end, the "
            f"paper reports 2.5x); {step_summary}")
    drm_verdict = None
    if has_drm:
        drm_target = float(g["drm"][:, -1].mean())
        drm_reach = {a: first_reach(c["iters"], c["drm"].mean(0), drm_target) for a, c in curves.items()}
        drm_ratio = (drm_reach["grpo"] / drm_reach["step_grpo"]
                     if drm_reach["step_grpo"] and drm_target > float(g["drm"][:, 0].mean()) else None)
        drm_verdict = (f"the DRM's score of the same panel ({'the reward being optimized' if reward == 'drm' else 'a judge'}): "
                       f"Step-GRPO reaches GRPO's final {drm_target:+.3f} at iteration {fmt(drm_reach['step_grpo'])} "
                       f"vs {fmt(drm_reach['grpo'])} (ratio {fmt(drm_ratio)}x) and ends at {s['drm'][:, -1].mean():+.3f}"
                       f" (from {g['drm'][:, 0].mean():+.3f})")
        if drm_ratio and reward == "drm":
            metrics["rl/iteration_ratio_drm"] = drm_ratio
    per_iter = {a: (c["drm_forwards"][-1] - c["drm_forwards"][0]) / max(1, c["iters"][-1] - c["iters"][0])
                for a, c in curves.items()}
    x0 = s["x0_forwards"][-1]
    cost = (f"Reward forwards per iteration: GRPO {per_iter['grpo']:.0f} (final images only), Step-GRPO "
            f"{per_iter['step_grpo']:.0f} (every child at every branching step"
            + ("; the DRM has half the policy's blocks and no CFG)." if reward == "drm" else
               f"; each child first needs its x0_hat, one policy forward with CFG: {x0} over the run, beside "
               f"{s['forwards'][-1]} policy forwards for the rollouts themselves)."))
    header = ["iteration", "policy forwards", "GRPO oracle", "Step-GRPO oracle", "correct (GRPO / Step)"]
    if has_drm:
        header.append("DRM score (GRPO / Step)")
    extra = {}
    for algo in ("grpo", "step_grpo"):
        rates = [r for r in (panel_extra_objects(out, rl_run(out, algo, reward, seed)) for seed in range(p["rl_seeds"]))
                 if r is not None]
        if rates:
            extra[algo] = np.array(rates)  # [seeds, (first, last)]
    extra_text = ""
    if len(extra) == 2:
        extra_text = ("Panel images showing an object their caption does not mention (oracle.has_extra_object on "
                      "the panels logged to MLflow; first -> last evaluation, mean over seeds): " + "; ".join(
                          f"{'GRPO' if a == 'grpo' else 'Step-GRPO'} {100 * v[:, 0].mean():.1f}% -> "
                          f"{100 * v[:, 1].mean():.1f}% (per seed {', '.join(f'{100 * x:.1f}%' for x in v[:, 1])})"
                          for a, v in extra.items()) + ".\n")
        for a, v in extra.items():
            metrics[f"rl/{a}{tag}_final_extra_objects"] = float(v[:, 1].mean())
    text = (f"Optimizing {REWARD_NAMES.get(reward, reward)}. Oracle grade of the fixed evaluation panel (every "
            f"caption twice, fixed seeds of its own, ODE; mean +- sd over {len(g['oracle'])} seed(s); the toy world "
            f"has only its 90 training captions, so the panel is not held out in prompts, only in seeds: it measures "
            f"the policy on what it was trained for, not generalization); policy forwards = "
            f"cumulative transformer forwards (CFG pair = 1) spent sampling rollouts, equal for both algorithms at "
            f"every iteration. {cost}\n\n" + _table(header, rows)
            + f"\n\nOracle gain over the run: GRPO {clear['grpo']}; Step-GRPO {clear['step_grpo']}.\n"
            + (f"\n{extra_text}" if extra_text else "") + overoptimization_text(out, p, reward, metrics))
    return text, {"curves": curves, "verdict": verdict, "target": target, "drm_verdict": drm_verdict,
                  "clear": clear, "extra": extra}


def stepwise_section(out: Path, metrics: dict) -> tuple[str, dict]:
    data = _load(out / "stepwise.json")
    if not data:
        return "Step-wise Sampling stage not run.\n", {}
    rows = []
    for r in data["rows"]:
        rows.append([r["k"], f"{r['oracle']:.4f} +- {r['oracle_sem']:.4f}",
                     f"{r['oracle_gain']:+.4f} +- {r['oracle_gain_sem']:.4f}", f"{100 * r['oracle_correct']:.1f}%",
                     f"{r['score']:+.3f}", f"{r['rms']:.4f}", f"{r['dssim']:.4f}", f"{r['t'] * 1000:.2f}"])
        metrics[f"stepwise/oracle_k{r['k']}"] = r["oracle"]
        metrics[f"stepwise/one_minus_ssim_k{r['k']}"] = r["dssim"]
    best = max(data["rows"], key=lambda r: r["k"])
    held = best["oracle_gain"] > 2 * best["oracle_gain_sem"]
    verdict = ("HELD" if held else "DID NOT HOLD") + (
        f": at k={best['k']} the oracle grade changes by {best['oracle_gain']:+.4f} +- {best['oracle_gain_sem']:.4f} "
        f"(paired, same prompts and seeds as k=1; criterion: > 2 s.e.); diversity (1 - SSIM across seeds) "
        f"{data['rows'][0]['dssim']:.4f} at k=1 -> {best['dssim']:.4f}")
    text = (f"{data['images']} images per k (every caption x seeds); the DRM selects, the oracle judges. "
            f"{data['drm'].replace(str(Path.cwd()) + '/', '')}."
            f"\n\n" + _table(["k", "oracle (mean +- s.e.)", "gain vs k=1 (paired)", "correct", "DRM score",
                              "pairwise RMS", "1 - SSIM", "ms / image"], rows) + "\n")
    if data.get("best_of") and "oracle" in data["best_of"][0]:
        b = max(data["best_of"], key=lambda r: r["k"])
        verdict += (f"; best-of-{b['k']} whole images selected by the same DRM: {b['oracle_gain']:+.4f}"
                    + (f" +- {b['oracle_gain_sem']:.4f}" if "oracle_gain_sem" in b else "")
                    + f" at {b['policy_forwards']} policy forwards per image vs Step-wise Sampling's "
                    f"{best.get('policy_forwards', '?')}")
        match = next((r for r in sorted(data["best_of"], key=lambda r: r["k"])
                      if r["oracle_gain"] >= best["oracle_gain"]), None)
        if "policy_forwards" in best:  # the same oracle gain bought with whole images: what it costs
            verdict += (f". At equal cost: best-of-k first matches step-wise k={best['k']}'s gain at k={match['k']}, "
                        f"{match['policy_forwards']} policy forwards per image, "
                        f"{match['policy_forwards'] / best['policy_forwards']:.1f}x Step-wise Sampling's "
                        f"{best['policy_forwards']} (DRM forwards per image: {best.get('drm_forwards', '?')} vs "
                        f"{match.get('drm_forwards', '?')})" if match else
                        f". At equal cost: no best-of-k up to k={b['k']} ({b['policy_forwards']} policy forwards per "
                        f"image) matches step-wise k={best['k']}'s gain at {best['policy_forwards']}")
        # the baseline: best-of-k whole images with the same DRM, k x the policy forwards
        pairs = zip(data["rows"], data["best_of"])
        text += ("\nBeside it, best-of-k whole images selected by the same DRM at s = 0 (k independent trajectories, "
                 "k x the policy forwards of Step-wise Sampling):\n\n" + _table(
                     ["k", "policy forwards / image (step-wise / best-of)", "oracle step-wise", "oracle best-of-k",
                      "gain vs k=1: step-wise / best-of"],
                     [[a["k"], f"{a.get('policy_forwards', '?')} / {b['policy_forwards']}",
                       f"{a['oracle']:.4f} +- {a['oracle_sem']:.4f}", f"{b['oracle']:.4f} +- {b['oracle_sem']:.4f}",
                       f"{a['oracle_gain']:+.4f} / {b['oracle_gain']:+.4f}"] for a, b in pairs]) + "\n")
    return text, {"verdict": verdict, "rows": data["rows"]}


# ---------------------------------------------------------------------------------------------- plots


def plots(drm: dict, rl: dict, sw: dict, directory: Path, orl: dict | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    if drm:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for init, colour in (("pretrained", "C0"), ("random", "C1")):
            ys = np.array([[a[t] for t in TIMESTEPS] for a in drm["acc"][init]])
            ax.errorbar(TIMESTEPS, ys.mean(0), yerr=ys.std(0), color=colour, marker="o", capsize=3,
                        label=f"{init} init")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="t", ylabel="held-out accuracy", title="DRM accuracy vs noise level")
        ax.legend()
        paths.append(_save(fig, directory / "drm_accuracy_vs_t.png"))
    if orl:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for algo, colour in (("grpo", "C1"), ("step_grpo", "C0")):
            c = orl["curves"][algo]
            m, sd = c["oracle"].mean(0), c["oracle"].std(0)
            ax.plot(c["iters"], m, color=colour, marker="o", label=f"{algo} (oracle reward)")
            ax.fill_between(c["iters"], m - sd, m + sd, color=colour, alpha=0.2)
        ax.set(xlabel="iteration (equal rollout compute per iteration)", ylabel="panel oracle score",
               title="RL with the oracle as the reward")
        ax.legend()
        paths.append(_save(fig, directory / "rl_oracle_reward.png"))
    if rl and rl["curves"]["grpo"]["drm"] is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, key, label in ((axes[0], "oracle", "panel oracle score (the truth)"),
                               (axes[1], "drm", "panel DRM score (the optimized reward)")):
            for algo, colour in (("grpo", "C1"), ("step_grpo", "C0")):
                c = rl["curves"][algo]
                m, sd = c[key].mean(0), c[key].std(0)
                ax.plot(c["iters"], m, color=colour, marker="o", label=algo)
                ax.fill_between(c["iters"], m - sd, m + sd, color=colour, alpha=0.2)
            ax.set(xlabel="iteration (equal rollout compute per iteration)", ylabel=label)
            ax.legend()
        axes[0].axhline(rl["target"], color="grey", lw=0.8, ls="--")
        fig.suptitle("GRPO vs Step-GRPO: evaluation panel (mean +- sd over seeds)")
        paths.append(_save(fig, directory / "rl_oracle_vs_iteration.png"))
    if sw:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [r["k"] for r in sw["rows"]]
        ax.errorbar(ks, [r["oracle"] for r in sw["rows"]], yerr=[r["oracle_sem"] for r in sw["rows"]], marker="o",
                    capsize=3, label="oracle")
        ax2 = ax.twinx()
        ax2.plot(ks, [r["dssim"] for r in sw["rows"]], color="C2", marker="s", label="1 - SSIM (diversity)")
        ax.set(xlabel="k", ylabel="oracle score", title="Step-wise Sampling vs k")
        ax2.set_ylabel("1 - SSIM across seeds")
        fig.legend(loc="lower right")
        paths.append(_save(fig, directory / "stepwise_vs_k.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- report


def write_report(out: Path, p: dict, timings: dict, report: Path, quick: bool = False) -> None:
    metrics: dict = {}
    # bench/ceiling.py's runs ("ceiling-<algo>-oracle-lr..."), not this chain's ceiling stage ("ceiling-grpo-oracle-g...")
    timings = {k: v for k, v in timings.items() if not re.match(r"ceiling-\w+-oracle-lr", k)}
    pre = _load(out / "pretrained" / "toy_meta.json")
    pairs = _load(out / "pairs" / "pairs_meta.json")
    drm_text, drm = drm_section(out, p, metrics)
    rl_text, rl = rl_section(out, p, metrics, "drm")
    orl_text, orl = rl_section(out, p, metrics, "oracle")
    ceil_text, ceil = ceiling_section(out, p, metrics)
    sw_text, sw = stepwise_section(out, metrics)
    figures = plots(drm, rl, sw, report.parent / "reproduction", orl)
    samples = out / "pretrained" / "samples.png"
    if samples.is_file():  # one ODE sample per caption from the pre-trained model
        import shutil

        figures.insert(0, Path(shutil.copy(samples, report.parent / "reproduction" / "pretrained_samples.png")))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    title = "# Reproduction in the toy world"
    md = [title + (" (QUICK SMOKE RUN: budgets far too small to mean anything)" if quick else ""),
          "",
          f"Written by `python bench/reproduce.py{' --quick' if quick else ''}` at commit {commit or 'unknown'} on "
          f"{platform.machine()} with {_cpus()} CPU cores, no GPU. Every number below was measured by that run; "
          "the verdicts are computed from them with the stated criteria.", "",
          *([(out / "PROVENANCE.md").read_text().strip(), ""] if (out / "PROVENANCE.md").is_file() else []),
          "## The toy world", "",
          "Procedural 32x32 scenes (drm_ray/toy/world.py): one shape at a named position (\"a red circle on the "
          "left\") or two shapes of one kind (\"two blue squares\"); 5 colours x 3 shapes x (5 positions + a count) "
          "= 90 captions. The hidden oracle (drm_ray/toy/oracle.py) grades an image against its caption from pixels "
          "alone: 0.75 x faithfulness (colour present, gating shape-classifier probability and placement / count) + "
          "0.25 x cleanliness (pixels on the palette, no stray colours), in [0, 1]; `correct` is its yes/no "
          "version. The pre-training scenes show an object their caption does not mention at rate "
          f"extra_object_rate={p.get('extra_object_rate', 0.0)} (a random shape in another caption colour, like web "
          "images whose captions leave things out); the oracle charges it through cleanliness (a saturated stray-"
          "colour penalty, -0.25), so the pre-trained policy has a flaw that alignment should remove and that is "
          "visible at the scale of whole objects. The toy preset's transformer is SD3's architecture (6 blocks, "
          "width 96), latents come from a "
          "fixed PCA patch codec (4x4 RGB patches -> 16 channels), text from seeded random CLIP/T5 encoders with "
          "word-level tokenizers.", "",
          "## Timings (wall clock on this machine)", "",
          "Each row is one stage's own wall time; stages re-run or run side by side (as the DRM and RL stages "
          "were for this report, beside other work on the same 2 cores) make the total an upper bound of the "
          "chain's cost.", "",
          _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]
                 + [["total", f"{sum(timings.values()):.0f} ({sum(timings.values()) / 60:.0f} min)"]]), ""]
    if pre:
        t, q, d = pre["training"], pre["samples"], pre["dataset"]
        md += ["## Pre-training", "",
               f"{t['steps']} steps x batch {t['batch_size']} ({pre['architecture']['params'] / 1e6:.2f}M parameters) "
               f"in {t['total_seconds'] / 60:.1f} min, final flow-matching loss {t['final_loss']:.3f}; codec keeps "
               f"{100 * pre['codec']['variance_kept']:.1f}% of patch variance (reconstruction RMSE "
               f"{pre['codec']['reconstruction_rmse']:.3f}). ODE samples ({q['num_steps']} steps, CFG "
               f"{q['guidance_scale']}) of every caption x {q['samples'] // 90} seeds: oracle {q['oracle_mean']:.3f} "
               f"+- {q['oracle_std']:.3f}, correct {100 * q['correct_fraction']:.1f}% (the dataset itself: "
               f"{d['oracle_mean']:.3f}, {100 * d['correct_fraction']:.1f}%)."
               + (f" Samples with an extra object: {100 * q['extra_object_fraction']:.1f}% (the dataset: "
                  f"{100 * d['extra_object_fraction']:.1f}%; classifier-free guidance suppresses most of them in "
                  "ODE samples, the SDE rollouts keep more: bench/policy_breakdown.py)."
                  if "extra_object_fraction" in q else ""), ""]
        metrics.update({"pretrain/oracle": q["oracle_mean"], "pretrain/correct": q["correct_fraction"]})
    if pairs:
        tr, ho = pairs["train"], pairs["heldout"]
        sources = tr.get("sources", {})
        mixed = len(sources) > 1
        md += ["## Oracle-labelled pairs", "",
               f"Train: {tr['pairs']} pairs from {tr['images']} "
               + ("images spanning the quality range (mean oracle grade per source: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sources.items()) + ")" if mixed
                  else "samples of the pre-trained model")
               + f" (oracle {tr['oracle_mean']:.3f} +- {tr['oracle_std']:.3f}); held-out: {ho['pairs']} pairs from "
               f"{ho['images']} ODE samples of the pre-trained model with other seeds. Pairs closer than "
               f"{tr['margin']} in oracle score are dropped.", ""]
    md += ["## (a, b) DRM: pretrained vs random init, accuracy vs t", "", drm_text]
    md += ["## (c) GRPO vs Step-GRPO at equal rollout compute, optimizing the DRM", "", rl_text]
    md += ["## (c') The same with the oracle as the reward: the ceiling, and the algorithm claim without "
           "reward-model error", "", orl_text]
    md += ["## (c'') The ceiling: GRPO with one x_1 per group and SDE on the first step, at two batch sizes; the same "
           "GRPO with the DRM", "", ceil_text]
    md += ["## (d) Step-wise Sampling vs k", "", sw_text]
    md += ["## Plots", ""] + [f"![{f.stem}](reproduction/{f.name})" for f in figures] + [""]
    md += ["## Verdicts", ""]
    if drm:
        md += [f"- A DRM worth optimizing (the accuracy bar of this reproduction): {drm['verdict']['bar']}. What was "
               "tried to reach it and what limits it: [reproduction/DRM_ATTEMPTS.md](reproduction/DRM_ATTEMPTS.md).",
               f"- DRM init (paper: pre-trained init beats random init): {drm['verdict']['init']}.",
               f"- DRM vs noise level (paper: accuracy highest at low t, still informative mid-way): "
               f"{drm['verdict']['t']}."]
    if orl:
        at_scale = "".join(f" With one x_1 per group and SDE and training on step(s) {p['ceiling_branch_steps']} "
                           f"(section (c'')), at {4 * g} trajectories per iteration and learning rate "
                           f"{ceiling_lr(p, g):g}: {ceil['clear'][g]}."
                           for g in (ceil["groups"] if ceil else ()))
        md += [f"- The ceiling (GRPO with the oracle as its reward must raise the panel oracle): at the rl stage's "
               f"batch, SDE on every step, {orl['clear']['grpo']}.{at_scale} The probes behind the RL settings, and "
               "why GRPO's gradient is noise at small batches (`bench/gradient_snr.py`): "
               "[reproduction/RL_SETTINGS.md](reproduction/RL_SETTINGS.md); GRPO with the oracle at 16x the batch "
               "in the world without extra objects: [CEILING.md](CEILING.md).",
               f"- Step-GRPO vs GRPO with the oracle as the reward (the algorithm claim, no reward-model error), "
               f"judged by the oracle: {orl['verdict']}."]
        if ceil and ceil["verdict"]:
            md += [f"- The same claim against GRPO with one x_1 per group and SDE on step(s) "
                   f"{p['ceiling_branch_steps']} (section (c'')): {ceil['verdict']}."]
        for v in (ceil or {}).get("compute_verdicts", []):
            md += [f"- The same claim in policy forwards, against a GRPO at a larger batch that does raise the "
                   f"oracle (section (c'')): {v}."]
    if rl:
        md += [f"- Step-GRPO vs GRPO with the DRM as the reward (paper: ~2.5x fewer iterations to GRPO's final "
               f"reward), judged by the oracle: {rl['verdict']}."]
        if rl["drm_verdict"]:
            md += [f"- The same comparison in {rl['drm_verdict']}."]
        if ceil and ceil.get("drm_verdict"):
            md += [f"- Step-GRPO vs GRPO with one x_1 per group and SDE on step(s) {p['ceiling_branch_steps']}, both "
                   f"with the DRM as the reward (section (c'')), judged by the oracle: {ceil['drm_verdict']}."]
        for v in (ceil or {}).get("drm_compute_verdicts", []):
            md += [f"- The same comparison in policy forwards, against that GRPO with the DRM at a larger batch "
                   f"(section (c'')): {v}."]
    if sw:
        md += [f"- Step-wise Sampling (paper: a better final image as k grows): {sw['verdict']}."]
    if drm and rl and rl["curves"]["grpo"]["drm"] is not None:
        c = rl["curves"]
        md += ["", drm_reading(float(drm["mean"]["pretrained"][0]),
                               {a: c[a]["drm"][:, -1].mean() - c[a]["drm"][:, 0].mean() for a in c},
                               {a: c[a]["oracle"][:, -1] - c[a]["oracle"][:, 0] for a in c},
                               (ceil or {}).get("drm_scale_gains"))]
    if orl:
        c = orl["curves"]
        md += ["", oracle_reading({a: c[a]["oracle"][:, -1] - c[a]["oracle"][:, 0] for a in c},
                                  int(c["step_grpo"]["x0_forwards"][-1]), int(c["step_grpo"]["forwards"][-1]))]
    md += ["", "Parameters of this run: " + ", ".join(f"{k}={v}" for k, v in p.items()) + "."]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(md) + "\n")
    _log_mlflow(out, p, metrics, report, figures)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _log_mlflow(out: Path, p: dict, metrics: dict, report: Path, figures: list[Path]) -> None:
    from drm_ray.tracking import Tracker

    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}", "drm-ray-bench", out, run_name="reproduce",
                      tags={"bench": "reproduce"})
    tracker.log_params(p)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
    tracker.log_text(report.read_text(), "REPRODUCTION.md")
    for f in figures:
        tracker.client.log_artifact(tracker.run_id, str(f), "plots")
    tracker.end()
    print(f"[reproduce] logged to MLflow run {tracker.run_id} ({tracker.uri})", flush=True)
