"""Driver-side handle of the learner: a Coordinator actor plus one long-lived Ray Train `TorchTrainer.fit()`.

The driver submits an update (the whole batch of recorded states); the Coordinator deals each rank its shard; rank 0
publishes the new LoRA state (an object-store reference, so the adapter is serialized once) and the update's
stats; the driver waits for that version with a timeout and, while waiting, checks that `fit()` is still alive so a
crashed learner is reported instead of waited on forever.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import ray
import torch


class Coordinator:
    """Async actor between the driver and the learner ranks (one per learner)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.queues = [asyncio.Queue() for _ in range(world_size)]
        self.published: dict[int, tuple[list, dict]] = {}
        self.changed = asyncio.Condition()
        self.generation = 0  # learner worker-group starts; > 1 means Ray Train restarted it
        self.members: dict[int, dict] = {}
        self.events: list[str] = []  # a short history for operators: submits, hand-outs, starts

    async def started(self, version: int, state_ref: list, stats: dict) -> None:
        """Rank 0 of a (re)started worker group: drop shards dealt to the old group, publish the restored state."""
        self.generation += 1
        self.queues = [asyncio.Queue() for _ in range(self.world_size)]
        self._event(f"generation {self.generation} started at v{version}")
        await self.publish(version, state_ref, stats)

    async def get_generation(self) -> int:
        return self.generation

    async def register(self, rank: int, pid: int, node_id: str) -> None:
        self.members[rank] = {"pid": pid, "node_id": node_id}

    async def get_members(self) -> dict:
        """{rank: {pid, node_id}} of the current worker group (for operators and fault-injection tests)."""
        return dict(self.members)

    async def submit(self, version: int, batch: dict, checkpoint_dir: str | None = None) -> None:
        if version + 1 in self.published:  # already applied (a resubmission that raced a restart)
            self._event(f"submit v{version} ignored: v{version + 1} is published")
            return
        self._event(f"submit v{version} (generation {self.generation})")
        n = batch["states"].shape[0]
        bounds = torch.linspace(0, n, self.world_size + 1).round().long().tolist()
        for rank, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            shard = {k: v[lo:hi] for k, v in batch.items()}
            self.queues[rank].put_nowait({"version": version, "shard": shard, "total_states": n,
                                          "checkpoint_dir": checkpoint_dir})

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
                 timeout_s: float, max_failures: int = 0, resources_per_worker: dict | None = None):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from drm_ray.workers.learner import learner_loop

        run_id = uuid.uuid4().hex[:8]
        name = f"drm-ray-coordinator-{run_id}"
        namespace = ray.get_runtime_context().namespace
        self.coordinator = ray.remote(Coordinator).options(name=name, num_cpus=0).remote(num_workers)
        self.timeout_s = timeout_s
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={**loop_config, "coordinator": name, "namespace": namespace,
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

    def wait_version(self, version: int, resend=None) -> tuple[ray.ObjectRef, dict]:
        """The LoRA state reference and stats of `version`; raises on learner death or after `timeout_s`.

        `resend()` is called when the learner's worker group restarted meanwhile (Ray Train's FailureConfig): the
        new group restored the last acknowledged version from its checkpoint and needs the update again.
        """
        deadline = time.monotonic() + self.timeout_s
        generation = ray.get(self.coordinator.get_generation.remote(), timeout=self.timeout_s)
        while True:
            self._check_alive()
            got = ray.get(self.coordinator.wait_version.remote(version, 2.0), timeout=self.timeout_s)
            if got is not None:
                refs, stats = got
                return refs[0], stats
            now = ray.get(self.coordinator.get_generation.remote(), timeout=self.timeout_s)
            if now != generation and generation > 0:
                self.restarts += now - generation
                deadline = time.monotonic() + self.timeout_s
                if resend is not None:
                    print(f"[learner] worker group restarted (generation {now}); re-sending the update to "
                          f"v{version}", flush=True)
                    resend()
            generation = now
            if time.monotonic() > deadline:
                raise TimeoutError(f"the learner did not publish LoRA version {version} within "
                                   f"{self.timeout_s:.0f}s (rollout.timeout_s)")

    def update(self, version: int, batch: dict, checkpoint_dir: str | None = None) -> tuple[ray.ObjectRef, dict]:
        """Train on `batch` (rolled out by policy `version`); returns the reference and stats of `version + 1`."""
        self._check_alive()

        def send():
            ray.get(self.coordinator.submit.remote(version, batch, checkpoint_dir), timeout=self.timeout_s)

        send()
        return self.wait_version(version + 1, resend=send)

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.stop.remote(), timeout=30)
        except Exception:  # the coordinator may already be gone; the thread join below still bounds shutdown
            pass
        self.thread.join(timeout=120)
        ray.kill(self.coordinator)
