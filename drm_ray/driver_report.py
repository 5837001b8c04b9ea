"""What the Step-GRPO driver tells people: the over-optimization flag of the evaluation panel, the progress bar
(one line per iteration off a terminal), message lines that the bar does not overwrite, and the end-of-job summary.

A mixin of `StepGRPODriver` (drm_ray/driver.py): it reads the driver's config, iteration, evaluation history and
rewards seen, and writes nothing but the console and the first evaluation panel (`first_panel`, the reference
of the over-optimization flag).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from drm_ray.console import Progress


def standard_error(x) -> float:
    """The standard error of the mean of `x` (0 for fewer than two values)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0


def _paired_change(before, after) -> tuple[float, float] | None:
    """The mean image-by-image change from `before` to `after` and its standard error; None unless both have the
    same two or more images."""
    if before is None or len(before) != len(after) or len(after) < 2:
        return None
    d = torch.as_tensor(after, dtype=torch.float64) - torch.as_tensor(before, dtype=torch.float64)
    return float(d.mean()), standard_error(d)


class DriverReport:
    def overoptimization(self, panel: dict[str, list[float]]) -> dict:
        """eval/overopt/<judge> = 1 when, since the first panel, the optimized reward rose and the judge fell, each
        by more than twice the standard error of its image-by-image change: the panel is the same prompts and seeds
        every time, so the comparison is paired, which sees a fall that the spread across prompts would hide.
        `panel` holds each image's weighted reward ("reward") and each judge's score (by name); the first panel
        is the reference, kept in checkpoints."""
        if self.first_panel is None:
            if self.eval_history:  # a checkpoint of an older drm-ray, which kept means only
                self.say(f"[{self.cfg.grpo.algo}] the checkpoint has no per-image evaluation panel: over-optimization "
                         f"is judged against the panel of iteration {self.iteration}")
            self.first_panel = panel
        first = self.first_panel
        reward = _paired_change(first.get("reward"), panel["reward"])
        flags = {}
        for judge in [k for k in panel if k != "reward"]:
            change = _paired_change(first.get(judge), panel[judge])
            if change is None:
                continue
            rose = reward is not None and reward[0] > 2 * reward[1]
            fell = change[0] < -2 * change[1]
            flags[f"eval/overopt/{judge}"] = float(rose and fell)
            if rose and fell:
                self.say(f"[{self.cfg.grpo.algo}] WARNING: the optimized reward rose ({reward[0]:+.4f} +- "
                         f"{reward[1]:.4f} per image since the first panel) while judge {judge} fell "
                         f"({change[0]:+.4f} +- {change[1]:.4f}), each by more than 2 standard errors of the change "
                         "on the same prompts and seeds: the reward's errors are being optimized; look at the images")
        return flags

    def say(self, line: str) -> None:
        """A message line that the progress bar does not overwrite."""
        if self.console is not None:
            self.console.write(line)
        else:
            print(line, flush=True)

    def progress(self, m: dict) -> None:
        """The progress bar (one line per iteration off a terminal): training reward, the latest evaluation panel,
        KL to the reference (and the clipped fraction with several updates per batch), seconds per phase."""
        g = self.cfg.grpo
        if self.console is None:
            # made after the first reported iteration: its clock starts when that iteration did
            self.console = Progress(g.iterations, self.iteration - 1, g.algo,
                                    start=time.perf_counter() - m["timing/iteration"])
        self.rewards_seen.append(m["reward/final_mean"])
        text = f"reward {m['reward/final_mean']:+.4f}"
        if self.eval_history:
            last = self.eval_history[-1]
            text += f" eval {last['eval/reward']:+.4f}" + "".join(
                f" {k.removeprefix('eval/judge/')} {v:+.3f}" for k, v in last.items()
                if k.startswith("eval/judge/") and not k.endswith("_sem"))
            if "eval/oracle_score" in last:
                text += f" oracle {last['eval/oracle_score']:.4f}"
        text += f" kl {m['train/kl_ref']:.1e}"
        if g.updates_per_iter > 1:
            text += f" clip {m['train/clip_frac']:.2f}"
        text += (f" | {m['timing/iteration']:.1f}s/it: rollout {m['timing/rollout']:.1f}s score {m['timing/score']:.1f}s"
                 f" learn {m['timing/learn']:.1f}s sync {m['timing/sync']:.1f}s")
        self.console.update(self.iteration, text)

    def summary(self, lora_dir: Path) -> str:
        """What improved and where the results are, for the end of the job."""
        g = self.cfg.grpo
        took = time.perf_counter() - self.started
        lines = [f"[step_grpo] done in {took / 60:.1f} min: {self.iteration} iterations of {g.algo} "
                 f"(policy v{self.version})"]
        r, n = self.rewards_seen, max(1, min(5, len(self.rewards_seen) // 2))
        if len(r) >= 2:
            lines.append(f"  training reward ({', '.join(self.cfg.reward.rewards)}): {sum(r[:n]) / n:+.4f} -> "
                         f"{sum(r[-n:]) / n:+.4f} (mean of the first / last {n} iterations' batches)")
        if len(self.eval_history) >= 2:
            first, last = self.eval_history[0], self.eval_history[-1]
            keys = [k for k in last if k.startswith("eval/") and k in first and not k.endswith("_sem")
                    and not k.startswith("eval/overopt/") and not (k == "eval/reward" and len(self.rl.rewards) == 1)]
            lines.append(f"  evaluation panel, iteration {first['iteration']} -> {last['iteration']}: " + ", ".join(
                f"{k.removeprefix('eval/')} {first[k]:+.4f} -> {last[k]:+.4f}" for k in keys))
            flagged = [k.removeprefix("eval/overopt/") for k, v in last.items() if k.startswith("eval/overopt/") and v]
            if flagged:
                lines.append(f"  WARNING: over-optimization flagged by judge(s) {', '.join(flagged)}: look at the "
                             "panel images in MLflow")
        uri = self.tracker.uri
        lines += [f"  LoRA (diffusers format): {lora_dir}",
                  f"  checkpoints: {self.out / 'checkpoints'} (the same run.output_dir resumes from the newest)",
                  f"  MLflow run {self.tracker.run_id}: mlflow ui --backend-store-uri {uri}"]
        return "\n".join(lines)
