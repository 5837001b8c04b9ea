"""Driver-side handle of the learner: a Coordinator actor plus one long-lived Ray Train `TorchTrainer.fit()`.

The driver submits an update: the small per-state tensors (state indices, steps, prompt indices, log-probs,
advantages) and the ObjectRefs of the rollout latents, nested in a list so that neither the Coordinator nor the
driver fetches them. The Coordinator deals each rank its shard of the small tensors plus the refs; each rank fetches
the latent chunks its shard needs. Rank 0 publishes the new LoRA state (an object-store reference, so the adapter
is serialized once) and the update's stats; the driver waits for that version with a timeout and, while waiting,
checks that `fit()` is still alive so a crashed learner is reported instead of waited on forever.

Fault tolerance: the learner saves its state (LoRA + optimizer) every `state_every` updates, after publishing, off
the critical path. The driver keeps every update since the newest state that is surely on disk; when Ray Train
restarts the worker group, the Coordinator reports the version the new group restored and the driver re-sends the
updates from there, in order, so the group replays to the current version with the same result bit for bit.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import ray
import torch

from drm_ray.dispatch import driver_get


class Coordinator:
    """Async actor between the driver and the learner ranks (one per learner)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.queues = [asyncio.Queue() for _ in range(world_size)]
        self.published: dict[int, tuple[list, dict]] = {}
        self.changed = asyncio.Condition()
        self.generation = 0  # learner worker-group starts; > 1 means Ray Train restarted it
        self.restored = -1  # the version the current generation started from
        self.members: dict[int, dict] = {}
        self.events: list[str] = []  # a short history for operators: submits, hand-outs, starts

    async def started(self, version: int, state_ref: list, stats: dict) -> None:
        """Rank 0 of a (re)started worker group: drop shards dealt to the old group, publish the restored state."""
        self.generation += 1
        self.restored = version
        self.queues = [asyncio.Queue() for _ in range(self.world_size)]
        self.published = {}  # versions past `version` are re-done by this generation (the driver replays them)
        self._event(f"generation {self.generation} started at v{version}")
        await self.publish(version, state_ref, stats)

    async def get_generation(self) -> tuple[int, int]:
        """(worker-group starts so far, the version the current group restored)."""
        return self.generation, self.restored

    async def register(self, rank: int, pid: int, node_id: str) -> None:
        self.members[rank] = {"pid": pid, "node_id": node_id}

    async def get_members(self) -> dict:
        """{rank: {pid, node_id}} of the current worker group (for operators and fault-injection tests)."""
        return dict(self.members)

    async def submit(self, version: int, batch: dict, latents: list, checkpoint_dir: str | None = None) -> None:
        """batch: the small tensors of the update (see `learner_batch`); latents: [refs of the rollout latent chunks
        (lists of GroupLatents), states per chunk], passed on to the ranks unresolved."""
        if version + 1 in self.published:  # already applied (a resubmission that raced a restart)
            self._event(f"submit v{version} ignored: v{version + 1} is published")
            return
        self._event(f"submit v{version} (generation {self.generation})")
        n = batch["advantages"].shape[0]
        bounds = torch.linspace(0, n, self.world_size + 1).round().long().tolist()
        for rank, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            shard = {k: v[lo:hi] for k, v in batch.items()}
            self.queues[rank].put_nowait({"version": version, "shard": shard, "total_states": n,
                                          "latents": latents, "checkpoint_dir": checkpoint_dir})

    async def next_work(self, rank: int):
        # A call from a worker that has since died keeps waiting on its generation's queue and may swallow a
        # shard sent before the restart was noticed; the driver re-sends on the new generation.
        work = await self.queues[rank].get()
        self._event(f"rank {rank} took {'stop' if work is None else 'v%d' % work['version']}")
        return work

    def _event(self, text: str) -> None:
        self.events = (self.events + [text])[-100:]

    async def get_events(self) -> list[str]:
        return list(self.events)

    async def stop(self) -> None:
        for q in self.queues:
            q.put_nowait(None)

    async def publish(self, version: int, state_ref: list, stats: dict) -> None:
        async with self.changed:
            self.published[version] = (state_ref, stats)
            for old in [v for v in self.published if v < version - 1]:
                del self.published[old]
            self.changed.notify_all()

    async def latest(self) -> int:
        return max(self.published, default=-1)

    async def wait_version(self, version: int, timeout_s: float = 5.0):
        """(state_ref_list, stats) of `version`, or None if it is not published within `timeout_s`."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: version in self.published), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.published[version]


class LearnerGroup:
    """Starts the learner's `fit()` in a background thread; `update()` sends a batch and returns the new LoRA."""

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
        self.updates: dict[int, tuple] = {}  # version -> (batch, latents, checkpoint_dir) not yet surely saved
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
        batch, latents, checkpoint_dir = self.updates[version]
        self._get(self.coordinator.submit.remote(version, batch, latents, checkpoint_dir))

    def _forget_saved(self, published: int) -> None:
        """Drop the updates before the newest surely saved state. Rank 0 saves version s after publishing it and
        before taking the next update, so once `published` is out, every multiple of `state_every` below it is on
        disk."""
        saved = (published - 1) // self.state_every * self.state_every
        self.saved = max(self.saved, saved)
        for v in [v for v in self.updates if v < self.saved]:
            del self.updates[v]
        for v in list(self.updates):  # a replayed update writes no job checkpoint again (it was committed)
            batch, latents, _ = self.updates[v]
            self.updates[v] = (batch, latents, None)

    def update(self, version: int, batch: dict, latents: list,
               checkpoint_dir: str | None = None) -> tuple[ray.ObjectRef, dict]:
        """Train on `batch` (rolled out by policy `version`; `latents` = [chunk refs, states per chunk]); returns
        the reference and stats of `version + 1`."""
        self._check_alive()
        if not self.keep_updates:
            self.updates.clear()
        self.updates[version] = (batch, latents, checkpoint_dir)
        self._send(version)
        return self.wait_version(version + 1)

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.stop.remote(), timeout=30)
        except Exception:  # the coordinator may already be gone; the thread join below still bounds shutdown
            pass
        self.thread.join(timeout=120)
        ray.kill(self.coordinator)
