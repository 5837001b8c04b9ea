"""The Step-GRPO / GRPO driver: the single controller, read top to bottom like the paper's algorithm.

    for each iteration:
        groups   = sample B prompts (one seed each)
        rollouts = rollout workers branch k SDE children at each branching step (one shared mean per state)
        scores   = reward scorers score every child at its noise level (and the final latents at s = 0)
        batch    = per-step group advantages (Step-GRPO) or per-image terminal advantages (GRPO)
        lora     = the learner takes grpo.updates_per_iter clipped policy-gradient steps (+ beta KL to the
                   adapter-free reference)
        sync       the new LoRA, serialized once, to every rollout worker
        log        MLflow metrics and timings; an ODE image panel every few iterations; checkpoints

Everything heavy lives in the actors (drm_ray/workers); the driver holds only prompts, a VAE for the image panel and
small tensors. The rollout latents stay in the object store: the driver holds their references and passes them to
the scorers and the learner, and receives only records, scores and statistics (`driver/bytes_in` per iteration does
not grow with the latent size; `rollout/payload_bytes` does). `--algo grpo` differs only in where advantages come
from.

The phases run one after another (`grpo.schedule=serial`) or pipelined (the default): each rollout chunk is scored
as soon as it is done and handed to the learner as soon as it is scored, and the learner trains each micro-batch
once its groups are in, with the same LoRA bit for bit. MLflow gets each role's busy seconds and utilization per
iteration (`busy/*`, `util/*`) and the critical path (`critical/*`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
import torch

from drm_ray.algorithms.rl_batch import learner_batch, num_scored, reward_stats, split_scores
from drm_ray.checkpoint import commit_checkpoint, latest_checkpoint, load_checkpoint, staging_dir
from drm_ray.data.prompts import PromptSampler, load_prompts
from drm_ray.diffusion.sampling import to_pil
from drm_ray.driver_report import DriverReport, standard_error
from drm_ray.dispatch import Pool, call_when_back, driver_get, run_pools, take_bytes_in
from drm_ray.models.lora import lora_checksum
from drm_ray.runtime import init_ray
from drm_ray.rl_setup import RLSetup, image_grid
from drm_ray.tracking import Tracker


class StepGRPODriver(DriverReport):
    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        init_ray()
        if not Path(cfg.run.output_dir).is_absolute() and len([n for n in ray.nodes() if n["Alive"]]) > 1:
            print(f"[step_grpo] WARNING: run.output_dir={cfg.run.output_dir} is relative on a multi-node cluster; "
                  "learner checkpoints land on each node's local disk and resume will not find them. Use a path "
                  "on shared storage (e.g. /shared/runs/...).", flush=True)
        self.prompts = load_prompts(cfg.data.prompts, cfg.model.preset)
        resume = latest_checkpoint(self.out)
        self.state, resume_lora = load_checkpoint(resume) if resume else ({}, None)
        self.iteration = self.state.get("iteration", 0)
        self.version = self.state.get("version", 0)
        self.sampler = (PromptSampler.from_state(self.state["sampler"]) if resume
                        else PromptSampler(len(self.prompts), cfg.run.seed))
        if resume:
            torch.set_rng_state(torch.tensor(self.state["torch_rng"], dtype=torch.uint8))
            print(f"[step_grpo] resuming from {resume} (iteration {self.iteration}, policy v{self.version})",
                  flush=True)
        self.tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, self.out,
                               run_name=cfg.tracking.run_name or cfg.grpo.algo, run_id=self.state.get("mlflow_run_id"),
                               tags={"job": "step_grpo", "algo": cfg.grpo.algo})
        if not resume:
            self.tracker.log_params(cfg.flat())
            self.tracker.log_text(cfg.to_yaml(), "config.yaml")
        self.restarts = {"rollout": 0, "scorer": 0}
        # Cumulative work, for comparisons at equal compute: transformer forwards (CFG pair = 1) while sampling
        # rollouts, DRM forwards while scoring them.
        self.compute = self.state.get("compute", {"policy_forwards": 0, "drm_forwards": 0})
        self.eval_history = self.state.get("eval_history", [])
        # each image's weighted reward and judge scores on the first panel: over-optimization is judged against it
        self.first_panel = self.state.get("first_panel")
        self.max_failures = max(1, cfg.rollout.max_restarts * (cfg.rollout.num_workers + cfg.rollout.num_scorers))
        self.console = None  # the progress bar (console.Progress), made when the first iteration is reported
        self.rewards_seen: list[float] = []  # training-batch reward per iteration of this process (summary)
        self.started = time.perf_counter()
        self.rl = RLSetup(cfg, self.out, self.prompts, resume_dir=resume / "learner" if resume else None,
                          start_version=self.version)
        self.lora_ref, _ = self.rl.learner.wait_version(self.version)
        self.sync(self.lora_ref, self.version)
        if resume_lora is not None and self.worker_checksums[0] != lora_checksum(resume_lora):
            raise RuntimeError("the learner restored a LoRA that differs from the checkpoint's lora_state")

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> dict:
        if self.iteration == 0:
            self.log_panel(step=0)
        summary = {}
        while self.iteration < self.cfg.grpo.iterations:
            summary.update(self.step())
        self.finish()
        return summary

    def step(self) -> dict:
        """One iteration: rollout, score, advantages, update, sync, log (and eval panel / checkpoint when due)."""
        g = self.cfg.grpo
        start = time.perf_counter()
        take_bytes_in()
        groups = self.sampler.next(g.prompts_per_iter)
        self.iteration += 1
        ckpt = staging_dir(self.out, self.iteration) if self.checkpoint_due() else None
        rollouts, child_scores, final_scores, train_stats, t = self.run_update(groups, ckpt, start)
        self.version += 1
        self.timed(t, "sync", self.sync, self.lora_ref, self.version)
        t["timing/iteration"] = time.perf_counter() - start
        t["critical/sync_s"] = t["timing/sync"]
        self.compute["policy_forwards"] += sum(r.num_final for r in rollouts) * self.cfg.sampling.num_steps
        if self.rl.x0_children:  # one policy forward per child for x0_hat (under "best" it also picks the child)
            self.compute["x0_forwards"] = self.compute.get("x0_forwards", 0) + self.candidates(rollouts)
        weights = [r.weight for r in self.rl.rewards]
        _, adv_stats = learner_batch(rollouts, g.algo, child_scores, final_scores, len(self.rl.branch_steps),
                                     g.adv_clip, weights, adv_norm=g.adv_norm)  # the whole batch's advantage stats
        wall = t["timing/iteration"]
        roles = {"rollout": (t.pop("busy/rollout"), self.cfg.rollout.num_workers),
                 "score": (t.pop("busy/score"), self.cfg.rollout.num_scorers),
                 "learn": (train_stats.get("timing/learner_compute", 0.0), 1)}  # rank 0's busy time
        for role, (busy, actors) in roles.items():
            t[f"busy/{role}_s"] = busy
            t[f"util/{role}"] = busy / max(wall * actors, 1e-9)  # busy / (wall x actors) of the role
        metrics = {**self.reward_metrics(rollouts, child_scores, final_scores, weights),
                   **adv_stats, **train_stats, **t,
                   "driver/bytes_in": float(take_bytes_in()),
                   "rollout/payload_bytes": float(sum(r.payload_bytes for r in rollouts)),
                   "rollout/groups": float(len(rollouts)),
                   "rollout/candidates_per_s": self.candidates(rollouts) / max(t["timing/rollout"], 1e-9),
                   "rollout/policy_version": float(self.version - 1),
                   "rollout/actor_restarts": float(self.restarts["rollout"]),
                   "score/actor_restarts": float(self.restarts["scorer"]),
                   # cumulative work so far (x0_forwards: image rewards' x0_hat of branching children)
                   **{f"compute/{name}": float(n) for name, n in self.compute.items()},
                   "train/learner_restarts": float(self.rl.learner.restarts)}
        self.tracker.log_metrics(metrics, self.iteration)
        if self.iteration % g.eval_every == 0 or self.iteration == g.iterations:
            metrics.update(self.log_panel(self.iteration))
        self.progress(metrics)  # after the panel, so an evaluation iteration's line shows its own panel
        if ckpt:
            self.checkpoint(ckpt)
        return metrics

    def run_update(self, groups: list[tuple[int, int, int]], ckpt: Path | None, start: float):
        """Rollout, scoring and the learner's update of one iteration, in the configured schedule.

        Rollout calls take `groups_per_call` groups each (a chunk), each worker the next chunk when free; one scorer
        call per chunk; the learner gets each chunk's learner-batch rows and a reference to its latents, which stay
        in the object store. `serial`: all rollouts, then all scoring, then the update. `pipelined`: a chunk is
        scored as soon as it is rolled out and sent to the learner as soon as it is scored; the learner trains each
        cell of its `IterationLayout` once the groups it covers are in. The cells, and so the LoRA, are the same bit
        for bit in both schedules (the per-chunk rows are the whole batch's rows: advantages are per group).

        Returns (rollouts, child scores, final scores, learner stats, timings): `timing/{rollout, score, learn}` are
        each phase's span (first start to last end; they overlap when pipelined), `busy/*` the actors' summed call
        time, `critical/*_s` the chain of waits and calls that ended last (the chunk scored last: waiting for a
        rollout worker, its rollout, waiting for a scorer, its scoring, and the learner's work after it).
        """
        g, ro = self.cfg.grpo, self.cfg.rollout
        algo, pipelined = g.algo, g.schedule == "pipelined"
        per_call = ro.groups_per_call
        chunks = [groups[i:i + per_call] for i in range(0, len(groups), per_call)]
        layout = self.rl.layout(len(groups))
        rolled: list = [None] * len(chunks)  # (records, ref of the chunk's latents)
        scored: list = [None] * len(chunks)  # (child scores, final scores)
        sent = []  # when the learner got its first chunk
        rollout_pool = Pool("rollout", self.rl.workers,
                            lambda w, chunk: w.rollout_split.options(num_returns=2).remote(chunk, self.version),
                            self.recover_worker, self.max_failures)
        score_pool = Pool("scoring", self.rl.scorers,
                          lambda s, c: s.score_rollouts.remote(c[0], [c[1]], algo, self.rl.sigmas),
                          self.recover_scorer, self.max_failures)

        def part(c: int) -> dict:
            records, ref = rolled[c]
            first = c * per_call  # the chunk's first group
            rows, _ = learner_batch(records, algo, *scored[c], len(self.rl.branch_steps), g.adv_clip,
                                    [r.weight for r in self.rl.rewards], first_state=first * layout.per_group,
                                    adv_norm=g.adv_norm)
            return {"group": first, "groups": len(records), "state": first * layout.per_group,
                    "states": len(records) * layout.per_group, "rows": rows, "latents": [ref]}

        def send(cs: list[int]) -> None:
            sent.append(time.perf_counter())
            self.rl.learner.submit(self.version, layout, [part(c) for c in cs], str(ckpt / "learner") if ckpt else None)

        def on_result(pool: Pool, c: int, value) -> None:
            if pool is rollout_pool:
                records = value[0]
                if [r.group_id for r in records] != [gid for gid, _, _ in chunks[c]]:
                    raise RuntimeError("rollout results do not match the submitted groups")  # each group once
                if sum(r.step_index.shape[0] for r in records) != len(records) * layout.per_group:
                    raise RuntimeError(f"a rollout chunk has states other than {layout.per_group} per group")
                rolled[c] = value
                if pipelined:
                    score_pool.add(c, value)
            else:
                scored[c] = split_scores(rolled[c][0], algo, value)
                if pipelined:
                    send([c])

        for c, chunk in enumerate(chunks):
            rollout_pool.add(c, chunk)
        if pipelined:
            run_pools([rollout_pool, score_pool], on_result, ro.timeout_s)
        else:
            run_pools([rollout_pool], on_result, ro.timeout_s)
            for c in range(len(chunks)):
                score_pool.add(c, rolled[c])
            run_pools([score_pool], on_result, ro.timeout_s)
            send(list(range(len(chunks))))
        self.restarts["rollout"] += rollout_pool.failures
        self.restarts["scorer"] += score_pool.failures
        self.lora_ref, train_stats = self.rl.learner.wait_version(self.version + 1)
        published = time.perf_counter()

        rollouts = [r for records, _ in rolled for r in records]
        self.compute["drm_forwards"] += num_scored(rollouts, algo)  # what is scored: GRPO sends final latents only
        child_scores = [x for child, _ in scored for x in child]
        final_scores = torch.cat([final for _, final in scored])
        r_spans, s_spans = rollout_pool.spans, score_pool.spans
        last = max(s_spans, key=lambda c: s_spans[c][1])  # the chunk scored last
        t = {"timing/rollout": max(e for _, e in r_spans.values()) - start,
             "timing/score": max(e for _, e in s_spans.values()) - min(b for b, _ in s_spans.values()),
             "timing/learn": published - sent[0],
             "busy/rollout": rollout_pool.busy_s, "busy/score": score_pool.busy_s,
             "critical/rollout_wait_s": r_spans[last][0] - start,
             "critical/rollout_s": r_spans[last][1] - r_spans[last][0],
             "critical/score_wait_s": s_spans[last][0] - r_spans[last][1],
             "critical/score_s": s_spans[last][1] - s_spans[last][0],
             "critical/learn_s": published - s_spans[last][1]}
        return rollouts, child_scores, final_scores, train_stats, t

    # ------------------------------------------------------------------------------------------ steps

    def reward_metrics(self, rollouts, child_scores, final_scores, weights) -> dict:
        """reward/* of the weighted sum of the rewards (the one reward's scores when there is one), and with several
        rewards reward/<name>/* of each (the kind, or kind-<source> for a spec with its own model)."""
        algo, steps = self.cfg.grpo.algo, self.rl.branch_steps
        w = torch.tensor(weights)
        out = reward_stats(rollouts, algo, [c @ w for c in child_scores], final_scores @ w, steps)
        if len(weights) > 1:
            for i, r in enumerate(self.rl.rewards):
                part = reward_stats(rollouts, algo, [c[..., i] for c in child_scores], final_scores[..., i], steps)
                out.update({k.replace("reward/", f"reward/{r.name}/", 1): v for k, v in part.items()})
        return out

    @staticmethod
    def timed(timings: dict, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings[f"timing/{name}"] = time.perf_counter() - start
        return out

    def recover_worker(self, index: int) -> None:
        """Wait for a restarted rollout worker and give it the current LoRA before it takes work again."""
        worker = self.rl.workers[index]
        call_when_back(lambda: worker.set_lora.remote(self.version, self.lora_ref), self.cfg.rollout.timeout_s,
                       f"rollout worker {index}")

    def recover_scorer(self, index: int) -> None:
        scorer = self.rl.scorers[index]
        call_when_back(lambda: scorer.ready.remote(), self.cfg.rollout.timeout_s, f"reward scorer {index}")

    def sync(self, lora_ref, version: int) -> None:
        """Load LoRA `version` into every rollout worker (one object-store copy, one wait); a worker that died on the
        way is waited for once and loaded again."""
        refs = [w.set_lora.remote(version, lora_ref) for w in self.rl.workers]
        try:
            checksums = driver_get(refs, timeout=self.cfg.rollout.timeout_s)
        except ray.exceptions.ObjectLostError:  # OwnerDiedError included
            # the learner process that published this state died (Ray Train restarts its group): the restarted
            # group restores and republishes `version` (the learner group replays updates as needed)
            self.lora_ref, _ = self.rl.learner.wait_version(version)
            return self.sync(self.lora_ref, version)
        except ray.exceptions.RayActorError:
            self.restarts["rollout"] += 1
            checksums = [call_when_back(lambda w=w: w.set_lora.remote(version, lora_ref), self.cfg.rollout.timeout_s,
                                        "rollout worker") for w in self.rl.workers]  # sequential: recovery path only
        self.worker_checksums = checksums
        if len(set(checksums)) != 1:
            raise RuntimeError(f"rollout workers disagree on LoRA v{version}: {checksums}")

    @staticmethod
    def candidates(rollouts) -> int:
        return sum(r.num_children for r in rollouts)

    def checkpoint_due(self) -> bool:
        g = self.cfg.grpo
        return self.iteration % g.checkpoint_every == 0 or self.iteration == g.iterations

    def checkpoint(self, staging: Path) -> None:
        state = {"iteration": self.iteration, "version": self.version, "sampler": self.sampler.state(),
                 "torch_rng": torch.get_rng_state().tolist(), "mlflow_run_id": self.tracker.run_id,
                 "algo": self.cfg.grpo.algo, "compute": self.compute, "eval_history": self.eval_history,
                 "first_panel": self.first_panel}
        lora = ray.get(self.lora_ref, timeout=self.cfg.rollout.timeout_s)  # every driver wait is bounded
        path = commit_checkpoint(self.out, self.iteration, staging, state, lora, self.rl.lora_cfg)
        self.say(f"[step_grpo] checkpoint {path}")

    def log_panel(self, step: int) -> dict:
        """ODE samples of the fixed evaluation prompts (held out when data.eval_prompts is set) and seeds: the mean
        of each optimized reward (eval/drm_score for the DRM, eval/<name>_score for the others) and of each judge
        (eval/judge/<name>), an image grid, and on the toy preset the hidden oracle's grade of the same images. A
        judge (or the toy oracle) that fell since the first panel while the optimized reward rose, image by image,
        is flagged (eval/overopt/<name> = 1) and printed: the reward model's errors are being optimized."""
        columns, images = self.rl.eval_panel()  # {name: each panel image's score}
        metrics = {f"eval/{name}_score": float(c.mean()) for name, c in columns.items() if not name.startswith("judge/")}
        for name, c in columns.items():
            if name.startswith("judge/"):
                metrics.update({f"eval/{name}": float(c.mean()), f"eval/{name}_sem": standard_error(c)})
        weights = {r.name: r.weight / sum(r.weight for r in self.rl.rewards) for r in self.rl.rewards}
        reward = sum(w * columns[k] for k, w in weights.items())  # each image's weighted reward
        metrics.update({"eval/reward": float(reward.mean()), "eval/reward_sem": standard_error(reward)})
        panel = {"reward": reward, **{k.removeprefix("judge/"): c for k, c in columns.items() if k.startswith("judge/")}}
        if self.cfg.model.preset == "toy":
            from drm_ray.toy.oracle import oracle_scores

            graded = oracle_scores(images, self.rl.eval_texts)
            metrics.update({"eval/oracle_score": float(graded.score.mean()),
                            "eval/oracle_correct": float(graded.correct.mean())})
            panel.setdefault("oracle", torch.as_tensor(graded.score, dtype=torch.float32))
        metrics.update(self.overoptimization({k: v.tolist() for k, v in panel.items()}))
        self.tracker.log_metrics(metrics, step)
        self.tracker.log_image(image_grid(to_pil(images)), f"panel/iter_{step:06d}.png")
        self.eval_history.append({"iteration": step, **self.compute, **metrics})
        return metrics

    def finish(self) -> None:
        state = ray.get(self.lora_ref, timeout=self.cfg.rollout.timeout_s)
        self.final_lora_checksum = lora_checksum(state)
        lora_dir = self.rl.save_lora(state, self.out / "lora")
        self.tracker.log_artifacts(lora_dir, "lora")
        (self.out / "summary.json").write_text(json.dumps({
            "iteration": self.iteration, "version": self.version, "algo": self.cfg.grpo.algo,
            "mlflow_run_id": self.tracker.run_id, "compute": self.compute, "eval": self.eval_history}, indent=2))
        self.rl.shutdown()
        self.tracker.end()
        if self.console is not None:
            self.console.close()
        print(self.summary(lora_dir), flush=True)

