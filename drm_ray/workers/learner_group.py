"""Driver-side handle of the learner: a Coordinator actor plus one long-lived Ray Train `TorchTrainer.fit()`.

The driver submits an update chunk by chunk (all at once in the serial schedule, as each chunk is scored in the
pipelined one): the small per-state tensors (state indices, steps, prompt indices, log-probs, advantages) and the
ObjectRef of the chunk's rollout latents, nested in a list so that neither the Coordinator nor the driver fetches
them. The Coordinator deals each rank its cells as soon as their groups are in (`IterationLayout`); each rank
fetches the latent chunks its cells need. Rank 0 publishes the new LoRA state (an object-store reference, so the adapter
is serialized once) and the update's stats; the driver waits for that version with a timeout and, while waiting,
checks that `fit()` is still alive so a crashed learner is reported instead of waited on forever.

Fault tolerance: the learner saves its state (LoRA + optimizer) every `state_every` updates, after publishing, off
the critical path. The driver keeps every update since the newest state that is surely on disk; when Ray Train
restarts the worker group, the Coordinator reports the version the new group restored and the driver re-sends the
updates from there, in order, so the group replays to the current version with the same result bit for bit.
"""

from __future__ import annotations

import threading
import time
import uuid

import ray

from drm_ray.dispatch import driver_get
from drm_ray.workers.coordinator import Coordinator


class LearnerGroup:
    """Starts the learner's `fit()` in a background thread; `submit()` sends scored chunks of an update,
    `wait_version()` returns the new LoRA."""

    def __init__(self, loop_config: dict, num_workers: int, use_gpu: bool, storage_path: str,
                 timeout_s: float, max_failures: int = 0, resources_per_worker: dict | None = None,
                 state_every: int = 1):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from drm_ray.workers.learner import learner_loop

        run_id = uuid.uuid4().hex[:8]
        name = f"drm-ray-coordinator-{run_id}"
        namespace = ray.get_runtime_context().namespace
        self.coordinator = ray.remote(Coordinator).options(name=name, num_cpus=0).remote(num_workers)
        self.timeout_s = timeout_s
        self.state_every = state_every
        self.keep_updates = max_failures > 0  # without restarts nothing is ever replayed
        self.updates: dict[int, tuple] = {}  # version -> (layout, checkpoint_dir, parts) not yet surely saved
        self.saved = loop_config["start_version"]  # newest version a restarted group can restore
        self.generation = 0  # the Coordinator's generation last seen by the driver
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={**loop_config, "coordinator": name, "namespace": namespace,
                               "state_every": state_every,
                               # per job run: restarts within this job restore from it, a new job does not
                               "state_dir": (f"{storage_path}/learner-{run_id}/learner_state"
                                             if max_failures > 0 else None)},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, placement_strategy="PACK",
                                         resources_per_worker=resources_per_worker),
            run_config=RunConfig(name=f"learner-{run_id}", storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        self.result: dict = {}
        self.restarts = 0
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            self.result["result"] = trainer.fit()
        except BaseException as err:  # reported by wait_version on the driver's thread
            self.result["error"] = err

    def _check_alive(self) -> None:
        if not self.thread.is_alive():
            err = self.result.get("error") or getattr(self.result.get("result"), "error", None)
            raise RuntimeError(f"the learner (Ray Train fit) stopped: {err!r}") from err

    def _get(self, ref):
        return driver_get(ref, timeout=self.timeout_s)

    def wait_version(self, version: int) -> tuple[ray.ObjectRef, dict]:
        """The LoRA state reference and stats of `version`; raises on learner death or after `timeout_s`.

        When the learner's worker group restarted meanwhile (Ray Train's FailureConfig), the new group restored the
        newest saved state; the updates from that version on are re-sent, in order.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._check_alive()
            got = self._get(self.coordinator.wait_version.remote(version, 2.0))
            generation, restored = self._get(self.coordinator.get_generation.remote())
            restarted = generation != self.generation and self.generation > 0  # (0: the first group is starting)
            if restarted:
                self.restarts += generation - self.generation
                deadline = time.monotonic() + self.timeout_s
                self._replay(restored, version, generation)
            self.generation = generation
            if got is not None and not restarted:  # after a restart, wait for the new group's publication
                self._forget_saved(version)
                refs, stats = got
                return refs[0], stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"the learner did not publish LoRA version {version} within "
                                   f"{self.timeout_s:.0f}s (rollout.timeout_s)")

    def _replay(self, restored: int, target: int, generation: int) -> None:
        """Re-send the updates restored .. target - 1 to a restarted worker group."""
        missing = [v for v in range(restored, target) if v not in self.updates]
        if missing:
            raise RuntimeError(f"the restarted learner restored v{restored}, but the driver no longer holds the "
                               f"updates {missing} to replay up to v{target} (learner state was expected at "
                               f"v{self.saved})")
        print(f"[learner] worker group restarted (generation {generation}) at v{restored}; re-sending "
              f"{target - restored} update(s) to reach v{target}", flush=True)
        for v in range(restored, target):
            self._send(v)

    def _send(self, version: int) -> None:
        layout, checkpoint_dir, parts = self.updates[version]
        self._get(self.coordinator.submit.remote(version, layout, checkpoint_dir, parts))

    def _forget_saved(self, published: int) -> None:
        """Drop the updates before the newest surely saved state. Rank 0 saves version s after publishing it and
        before taking the next update, so once `published` is out, every multiple of `state_every` below it is on
        disk."""
        saved = (published - 1) // self.state_every * self.state_every
        self.saved = max(self.saved, saved)
        for v in [v for v in self.updates if v < self.saved]:
            del self.updates[v]
        for v in list(self.updates):  # a replayed update writes no job checkpoint again (it was committed)
            layout, _, parts = self.updates[v]
            self.updates[v] = (layout, None, parts)

    def submit(self, version: int, layout, parts: list, checkpoint_dir: str | None = None) -> None:
        """Send scored rollout chunks of update `version` (rolled out by policy `version`; `layout`: how its states
        are dealt, see `IterationLayout`; parts: see `Coordinator.submit`). The learner starts on every cell whose
        groups are in; call `wait_version(version + 1)` once all the update's chunks are sent."""
        self._check_alive()
        if not self.keep_updates:
            self.updates = {v: u for v, u in self.updates.items() if v == version}
        _, _, sent = self.updates.setdefault(version, (layout, checkpoint_dir, []))
        sent.extend(parts)
        self._get(self.coordinator.submit.remote(version, layout, checkpoint_dir, parts))

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.stop.remote(), timeout=30)
        except Exception:  # the coordinator may already be gone; the thread join below still bounds shutdown
            pass
        self.thread.join(timeout=120)
        ray.kill(self.coordinator)
