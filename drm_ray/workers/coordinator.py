"""The learner's Coordinator: an async actor between the driver and the learner ranks (one per learner group).

It imports nothing but torch (the updates it deals are tensors; through drm_ray.algorithms.rl_batch), not the model
stack: an actor process imports the module that defines its class, and diffusers / peft / transformers would add ~5
CPU-seconds to every job's start-up.
"""

from __future__ import annotations

import asyncio

import torch

from drm_ray.algorithms.rl_batch import IterationLayout, chunk_sources, select_states


class Coordinator:
    """Async actor between the driver and the learner ranks (one per learner)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.updates: dict[int, dict] = {}  # version -> {layout, checkpoint_dir, parts by first group, next row}
        self.dealing = -1  # the version whose cells are being dealt (earlier ones are done for this generation)
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
        self.dealing = version  # parts already received are dealt again, from the first row, in version order
        self.updates = {v: {**u, "next": (0, 0)} for v, u in self.updates.items() if v >= version}
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

    async def submit(self, version: int, layout: IterationLayout, checkpoint_dir: str | None, parts: list) -> None:
        """Some scored groups of update `version` (rolled out by policy `version`). A part is one rollout chunk:
        {group: its first group, groups, state: its first state number, states, rows: its learner-batch rows
        (`learner_batch`), latents: [ref of the chunk's latents (a list of GroupLatents)], passed on unresolved}.
        Every cell whose groups are all in is dealt at once, in order (minibatch, row); a part received twice is
        kept once."""
        if version + 1 in self.published or version < self.dealing:  # already applied (a resubmission)
            self._event(f"submit v{version} ignored: applied")
            return
        u = self.updates.setdefault(version, {"layout": layout, "checkpoint_dir": checkpoint_dir, "parts": {},
                                              "next": (0, 0)})
        for part in parts:
            u["parts"].setdefault(part["group"], part)
        self._event(f"submit v{version}: {len(u['parts'])} chunk(s) in (generation {self.generation})")
        self._deal()

    def _deal(self) -> None:
        """Deal the ready rows of the version being dealt; move on to the next version when one is complete."""
        while self.dealing in self.updates:
            u = self.updates[self.dealing]
            lay: IterationLayout = u["layout"]
            have = set()
            for part in u["parts"].values():
                have.update(range(part["group"], part["group"] + part["groups"]))
            j, row = u["next"]
            while j < lay.updates:
                lo, hi = lay.row_groups(j, row)
                if not set(range(lo, hi)) <= have:
                    return
                self._deal_row(self.dealing, u, j, row)
                j, row = (j, row + 1) if row + 1 < lay.accum else (j + 1, 0)
                u["next"] = (j, row)
            self.dealing += 1

    def _deal_row(self, version: int, u: dict, j: int, row: int) -> None:
        lay: IterationLayout = u["layout"]
        parts = sorted(u["parts"].values(), key=lambda p: p["group"])
        chunks = [(p["state"], p["states"], p["latents"]) for p in parts]
        for rank in range(self.world_size):
            lo, hi = lay.cell_bounds(j, row, rank)
            touching = [p for p in parts if p["state"] < hi and p["state"] + p["states"] > lo]
            rows = [select_states(p["rows"], lo, hi) for p in touching]
            cell = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else {}
            if not cell:  # no states at all in this cell (more cells than states)
                cell = {k: v[:0] for k, v in parts[0]["rows"].items()}
            self.queues[rank].put_nowait({
                "version": version, "minibatch": j, "minibatches": lay.updates, "row": row, "rows": lay.accum,
                "total": lay.total(j), "cell": cell, "sources": chunk_sources(cell["state_index"], chunks),
                "checkpoint_dir": u["checkpoint_dir"]})

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
            for done in [v for v in self.updates if v < version]:  # the driver keeps what a replay needs
                del self.updates[done]
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
