"""The learner's Coordinator: an async actor between the driver and the learner ranks (one per learner group).

It imports nothing but torch (the updates it deals are tensors; through drm_ray.algorithms.rl_batch), not the model
stack: an actor process imports the module that defines its class, and diffusers / peft / transformers would add ~5
CPU-seconds to every job's start-up.
"""

from __future__ import annotations

import asyncio

from drm_ray.algorithms.rl_batch import minibatch_shards


class Coordinator:
    """Async actor between the driver and the learner ranks (one per learner)."""

    def __init__(self, world_size: int, updates_per_iter: int = 1):
        self.world_size = world_size
        self.updates_per_iter = updates_per_iter
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
        shards, totals = minibatch_shards(batch, self.updates_per_iter, self.world_size)
        for rank in range(self.world_size):
            self.queues[rank].put_nowait({"version": version, "minibatches": shards[rank], "totals": totals,
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
