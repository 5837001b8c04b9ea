"""Benchmark: the paper's claims in the toy world, end to end through the real jobs (a benchmark, not a test).

    python bench/reproduce.py                      # the whole chain (~4 h on 2 CPU cores) -> docs/REPRODUCTION.md
    python bench/reproduce.py --quick              # a smoke run of every stage (~6 min) -> <out>/REPRODUCTION.md
    python bench/reproduce.py --stages rl,report   # re-run some stages; finished runs are reused unless --force

Stages, each a subprocess of a job (so the chain is exactly what a user runs), outputs under --out:
1. pretrain   jobs/pretrain_toy.py: the toy transformer (flow matching on procedural scenes, 60% of which show an
              object their caption does not mention: the pre-trained policy adds one to ~11% of its ODE samples and
              ~22% of its SDE rollouts, a whole-object flaw for RL to remove; --set extra_object_rate=0 is the
              world of the reports before 2026-12-03).
2. pairs      jobs/toy_pairs.py: the pre-trained model's own ODE samples (480 per caption, 4,000 candidate pairs per
              caption: the data behind the first DRM to meet the accuracy bar, DRM_ATTEMPTS.md row 15), labelled by
              the hidden oracle (mix=True: a training set that also spans other guidance scales, noise levels,
              renders and other captions' renders; measured once, it lowered held-out accuracy at t=0 from 0.595 to
              0.545, so it is off).
3. drm        jobs/preprocess.py encodes the three pair sets once; jobs/train_drm.py with drm.init=pretrained and
              =random (equal steps, data, seeds; drm_train_blocks=1: only the last kept block and the head learn,
              the protocol under which the pre-trained init shows in this world, docs/reproduction/DRM_ATTEMPTS.md),
              keeping the step with the best accuracy on the validation pairs (a split of its own), then
              jobs/eval_drm.py on the held-out pairs at t = 0, 250, 500, 750, 950.
4. rl         jobs/step_grpo.py --algo grpo and --algo step_grpo, several seeds, each optimizing the first
              pretrained-init DRM and, separately, the oracle (Step-GRPO grades each child through its x0_hat; the
              DRM judges those runs), at equal rollout compute per iteration: GRPO samples k trajectories for each
              of B/k prompts, Step-GRPO one trajectory for each of B prompts (the same number of transformer
              forwards, and the same number of trained states); the oracle grades the fixed 180-image evaluation
              panel every few iterations.
5. ceiling    jobs/step_grpo.py --algo grpo with the oracle as the reward, each group's trajectories from one x_1
              (grpo.shared_initial_noise) and SDE and training on the first step only (grpo.branch_steps=[0]), so
              a group's rewards differ only by what the one trained step drew; at the rl stage's batch (4 groups of
              k=4: equal rollout compute with its Step-GRPO) and at 16x that (64 groups), each batch at its
              learning rate (ceiling_lrs): can GRPO raise the panel oracle at all, and how fast against Step-GRPO?
              (The rl stage's GRPO, SDE on every step and one x_1 per trajectory as in Flow-GRPO, does not at its
              batch: docs/reproduction/RL_SETTINGS.md, bench/gradient_snr.py.) Then the same GRPO with the DRM as
              its reward at the batches of ceiling_drm_groups (the rl stage's, and 64 groups): the DRM claim judged
              against a GRPO that can move the oracle, in iterations at equal batch and in policy forwards at 16x.
6. stepwise   bench/stepwise_cost.py: Step-wise Sampling with the DRM for several k on every caption x several seeds,
              graded by the oracle (the DRM selects, the oracle judges), with diversity across seeds.
7. report     tables and plots -> REPRODUCTION.md, everything logged to one MLflow run ("reproduce") in
              <out>/mlflow.db beside the jobs' own runs. When some stages' outputs were replaced by hand (new pairs
              and DRMs from another work directory, the runs that use the DRM re-run, the rest kept), say so in
              <out>/PROVENANCE.md: the report prints it under its first line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("pretrain", "pairs", "drm", "rl", "ceiling", "stepwise", "report")
FULL = dict(pretrain_steps=2500, extra_object_rate=0.6, samples=480, pairs=4000, val=8, val_pairs=32, heldout=16,
            heldout_pairs=64,
            drm_steps=6000, drm_val_every=500, drm_seeds=1, drm_train_blocks=1,
            rl_seeds=3, rl_rewards=("drm", "oracle"), rl_algos=("grpo", "step_grpo"), rl_lr=2e-3, rl_updates=1,
            rl_clip=1e-4, iterations=40, eval_every=5, prompts=16, ks="1,2,4,8", stepwise_seeds=4, stepwise_prompts=90,
            ceiling_seeds=3, ceiling_groups=(4, 64), ceiling_lrs=(2e-3, 1e-3), ceiling_iterations=40,
            ceiling_eval_every=10, ceiling_branch_steps="0", ceiling_drm_groups=(4, 64), mix=False)
QUICK = dict(pretrain_steps=150, extra_object_rate=0.6, samples=6, pairs=10, val=3, val_pairs=4, heldout=4,
             heldout_pairs=4, drm_steps=60, drm_val_every=30, drm_seeds=1, drm_train_blocks=-1,
             rl_seeds=1, rl_rewards=("drm", "oracle"), rl_algos=("grpo", "step_grpo"), rl_lr=1e-3, rl_updates=2,
             rl_clip=2e-3, iterations=4, eval_every=2, prompts=8, ks="1,2", stepwise_seeds=2, stepwise_prompts=10,
             ceiling_seeds=1, ceiling_groups=(2, 4), ceiling_lrs=(1e-3, 1e-3), ceiling_iterations=4,
             ceiling_eval_every=2, ceiling_branch_steps="0", ceiling_drm_groups=(2,), mix=False)


class Chain:
    def __init__(self, out: Path, p: dict, force: bool):
        self.out, self.p, self.force = out, p, force
        self.model = f"model.path={out / 'pretrained'}"
        self.tracking = f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"
        self.timings_file = out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        self.ran: dict[str, float] = {}  # stages this process ran (seconds), written over the file's entries

    def run(self, name: str, cmd: list[str], done: Path) -> None:
        """Run a job unless its output exists; record its wall time under `name`."""
        if done.exists() and not self.force:
            print(f"[reproduce] {name}: reusing {done}", flush=True)
            return
        print(f"[reproduce] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not done.exists():
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"[reproduce] {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        self.ran[name] = time.perf_counter() - start
        if self.timings_file.is_file():  # another stage may run beside this one: keep what it recorded
            self.timings = json.loads(self.timings_file.read_text())
        self.timings.update(self.ran)
        self.timings_file.write_text(json.dumps(self.timings, indent=2))
        print(f"[reproduce] {name}: {self.timings[name]:.0f} s", flush=True)

    # ------------------------------------------------------------------------------------------ stages

    def pretrain(self) -> None:
        self.run("pretrain", ["jobs/pretrain_toy.py", "--steps", str(self.p["pretrain_steps"]),
                              "--extra-object-rate", str(self.p["extra_object_rate"]), self.model,
                              f"run.output_dir={self.out / 'pretrain'}", self.tracking],
                 self.out / "pretrained" / "toy_meta.json")

    def pairs(self) -> None:
        self.run("pairs", ["jobs/toy_pairs.py", "--out", str(self.out / "pairs"), "--samples", str(self.p["samples"]),
                           "--pairs", str(self.p["pairs"]), "--heldout-samples", str(self.p["heldout"]),
                           "--heldout-pairs", str(self.p["heldout_pairs"]), "--val-samples", str(self.p["val"]),
                           "--val-pairs", str(self.p["val_pairs"]), self.model,
                           *(["--mix"] if self.p.get("mix") else [])],
                 self.out / "pairs" / "pairs_meta.json")

    def drm_dir(self, init: str, seed: int) -> Path:
        return self.out / "drm" / f"{init}-s{seed}"

    def drm(self) -> None:
        caches = {}
        for split in ("train", "val", "heldout"):  # encoded once, shared by every DRM run
            caches[split] = self.out / "cache" / split
            self.run(f"cache-{split}", ["jobs/preprocess.py", "--config", "toy", self.model, "--pairs",
                                        str(self.out / "pairs" / f"{split}.parquet"), "--out", str(caches[split]),
                                        "--batch-size", "64", "--overwrite"], caches[split] / "meta.json")
        for seed in range(self.p["drm_seeds"]):
            for init in ("pretrained", "random"):
                run = self.drm_dir(init, seed)
                common = ["--config", "toy", self.model, f"run.output_dir={run}", f"run.seed={seed}", self.tracking]
                self.run(f"drm-{init}-s{seed}", ["jobs/train_drm.py", *common, "--cache", str(caches["train"]),
                                                 f"drm.init={init}",
                                                 f"drm.train_steps={self.p['drm_steps']}",
                                                 f"data.heldout_data={caches['val']}",
                                                 f"drm.val_every={self.p['drm_val_every']}",
                                                 "drm.val_pairs=100000",  # every validation pair
                                                 *([f"drm.train_blocks={self.p['drm_train_blocks']}"]
                                                   if self.p["drm_train_blocks"] >= 0 else []),
                                                 f"tracking.run_name=train_drm-{init}-s{seed}"],
                         run / "drm" / "drm_config.json")
                self.run(f"eval-{init}-s{seed}", ["jobs/eval_drm.py", *common, "--drm", str(run / "drm"), "--cache",
                                                  str(caches["heldout"]), "--json",
                                                  str(run / "eval.json"), f"tracking.run_name=eval_drm-{init}-s{seed}"],
                         run / "eval.json")

    def rl_dir(self, algo: str, reward: str, seed: int) -> Path:
        from bench.reproduce_report import rl_run

        return rl_run(self.out, algo, reward, seed)

    def rl(self) -> None:
        """GRPO and Step-GRPO with each reward of `rl_rewards`, several seeds, equal rollout compute per iteration.
        With the oracle, Step-GRPO grades each child through its denoised estimate x0_hat (a policy forward per
        child); the DRM, where there is one, judges those runs' panels (eval/judge/drm)."""
        k = 4
        drm = self.drm_dir("pretrained", 0) / "drm"
        for seed in range(self.p["rl_seeds"]):
            for reward in self.p["rl_rewards"]:
                for algo in self.p.get("rl_algos", ("grpo", "step_grpo")):
                    run = self.rl_dir(algo, reward, seed)
                    prompts = self.p["prompts"] // k if algo == "grpo" else self.p["prompts"]
                    judge = ["reward.judges=[drm]"] if reward != "drm" and drm.is_dir() else []
                    self.run(f"rl-{algo}-{reward}-s{seed}", [
                        "jobs/step_grpo.py", "--config", "toy", "--algo", algo, self.model, self.tracking,
                        f"reward.drm_path={drm}", f"reward.rewards=[{reward}]", *judge, f"run.output_dir={run}",
                        f"run.seed={seed}", f"sampling.k={k}", f"grpo.prompts_per_iter={prompts}",
                        f"grpo.iterations={self.p['iterations']}", f"grpo.eval_every={self.p['eval_every']}",
                        f"grpo.checkpoint_every={self.p['iterations']}", f"learner.lr={self.p['rl_lr']}",
                        f"grpo.updates_per_iter={self.p['rl_updates']}", f"grpo.clip_eps={self.p['rl_clip']}",
                        f"tracking.run_name={algo}-{reward}-s{seed}"], run / "summary.json")

    def ceiling_dir(self, groups: int, seed: int, reward: str = "oracle") -> Path:
        from bench.reproduce_report import ceiling_run

        return ceiling_run(self.out, groups, seed, reward)

    def ceiling(self) -> None:
        """GRPO with the oracle, one x_1 per group, SDE and training on `ceiling_branch_steps`, at each batch of
        `ceiling_groups` prompt groups (k=4 trajectories each), each batch at its learning rate of `ceiling_lrs`;
        then the same GRPO with the DRM as its reward at each batch of `ceiling_drm_groups` (the DRM claim against a
        GRPO that can move the oracle)."""
        from bench.reproduce_report import ceiling_lr

        p = self.p
        drm = self.drm_dir("pretrained", 0) / "drm"
        runs = [("oracle", g) for g in p["ceiling_groups"]]
        if drm.is_dir():
            runs += [("drm", g) for g in p.get("ceiling_drm_groups", ())]
        for reward, groups in runs:
            for seed in range(p["ceiling_seeds"]):
                run = self.ceiling_dir(groups, seed, reward)
                name = f"ceiling-grpo-{reward}-g{groups}-s{seed}"
                self.run(name, [
                    "jobs/step_grpo.py", "--config", "toy", "--algo", "grpo", self.model, self.tracking,
                    f"reward.rewards=[{reward}]", *([f"reward.drm_path={drm}"] if reward == "drm" else []),
                    f"run.output_dir={run}", f"run.seed={seed}", "sampling.k=4",
                    f"grpo.prompts_per_iter={groups}", f"grpo.iterations={p['ceiling_iterations']}",
                    f"grpo.eval_every={p['ceiling_eval_every']}", f"grpo.checkpoint_every={p['ceiling_iterations']}",
                    f"learner.lr={ceiling_lr(p, groups)}", f"grpo.updates_per_iter={p['rl_updates']}",
                    f"grpo.clip_eps={p['rl_clip']}", f"grpo.branch_steps=[{p['ceiling_branch_steps']}]",
                    "grpo.shared_initial_noise=true", f"tracking.run_name={name}"],
                    run / "summary.json")

    def stepwise(self) -> None:
        self.run("stepwise", ["bench/stepwise_cost.py", "--config", "toy", self.model,
                              "--drm", str(self.drm_dir("pretrained", 0) / "drm"), "--ks", self.p["ks"],
                              "--num-prompts", str(self.p["stepwise_prompts"]), "--seeds",
                              str(self.p["stepwise_seeds"]), "--batch-size", "90", "--repeats", "1", "--best-of",
                              "--out", str(self.out / "stepwise"), "--json", str(self.out / "stepwise.json")],
                 self.out / "stepwise.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work directory (default outputs/reproduce[_quick])")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage with tiny budgets")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--force", action="store_true", help="re-run stages whose outputs exist")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override budget parameters of FULL / QUICK, e.g. --set samples=960 drm_steps=6000")
    parser.add_argument("--report", default=None, help="report path (default docs/REPRODUCTION.md; "
                                                         "<out>/REPRODUCTION.md with --quick)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {list(STAGES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in p:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(p)}")
        p[key] = type(p[key])(value) if not isinstance(p[key], (bool, tuple)) else json.loads(value)
    if len(p["ceiling_lrs"]) != len(p["ceiling_groups"]):
        parser.error(f"ceiling_lrs {list(p['ceiling_lrs'])} must give one learning rate per entry of ceiling_groups "
                     f"{list(p['ceiling_groups'])}")
    out = Path(args.out or ROOT / "outputs" / ("reproduce_quick" if args.quick else "reproduce")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chain = Chain(out, p, args.force)
    for stage in STAGES[:-1]:
        if stage in stages:
            getattr(chain, stage)()
    if "report" in stages:
        from bench.reproduce_report import write_report

        report = Path(args.report) if args.report else (out / "REPRODUCTION.md" if args.quick
                                                        else ROOT / "docs" / "REPRODUCTION.md")
        write_report(out, p, chain.timings, report, quick=args.quick)
        print(f"[reproduce] report written to {report}", flush=True)


if __name__ == "__main__":
    main()
