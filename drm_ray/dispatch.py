"""Work over a pool of actors that may die: submit everything, wait once per completion, resubmit what was lost.

The driver hands each free actor the next task and waits with `ray.wait` (never a `ray.get` in a loop over actors).
A task whose actor died (Ray restarts it: `max_restarts`) or answered that it holds a stale policy is resubmitted
after `recover(actor_index)` has brought that actor back; every task's result is kept exactly once, in task order,
so no group is lost or counted twice. Every wait has a timeout that names what was outstanding.

A call may return several refs (`num_returns`): the first is waited for and fetched, the others (the large payloads)
are passed through as references. `driver_get` is the driver's `ray.get`: it counts the bytes of the tensors and
arrays it returns (`driver/bytes_in`), which must not grow with the latent size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import fields, is_dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch

log = logging.getLogger(__name__)


class StaleLoRAError(RuntimeError):
    """A rollout worker does not hold the policy version the driver asked for (e.g. it restarted and lost its
    LoRA): recoverable, like a dead actor."""


RECOVERABLE = (ray.exceptions.RayActorError, StaleLoRAError)
_bytes_in = [0]  # what the driver fetched since the last `take_bytes_in`


def tensor_bytes(obj) -> int:
    """Bytes of the tensors and numpy arrays in `obj` (nested lists, tuples, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in fields(obj))
    return 0


def driver_get(refs, timeout: float | None = None):
    """`ray.get` on the driver, counting the bytes received."""
    out = ray.get(refs, timeout=timeout)
    _bytes_in[0] += tensor_bytes(out)
    return out


def take_bytes_in() -> int:
    """Bytes `driver_get` received since the last call."""
    n, _bytes_in[0] = _bytes_in[0], 0
    return n


class Pool:
    """Tasks on a pool of actors that may die: each free actor takes the next task; a task whose actor failed
    recoverably is put back first in line after `recover(actor_index)`. Records each task's (submitted, done) times
    on the driver's clock (`spans`) and the pool's busy seconds, for utilization and the critical path."""

    def __init__(self, what: str, actors: list, submit: Callable[[Any, Any], Any], recover: Callable[[int], None],
                 max_failures: int):
        self.what, self.actors, self.submit, self.recover = what, actors, submit, recover
        self.max_failures = max_failures
        self.todo: deque = deque()
        self.free = deque(range(len(actors)))
        self.pending: dict[ray.ObjectRef, tuple] = {}
        self.failures = 0
        self.busy_s = 0.0
        self.spans: dict[Any, tuple[float, float]] = {}  # task id -> (submitted, done), time.perf_counter()

    def add(self, task_id, task) -> None:
        self.todo.append((task_id, task))

    @property
    def idle(self) -> bool:
        return not self.todo and not self.pending

    def launch(self) -> None:
        while self.free and self.todo:
            a, (tid, task) = self.free.popleft(), self.todo.popleft()
            refs = self.submit(self.actors[a], task)
            refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
            self.pending[refs[0]] = (a, tid, task, refs[1:], time.perf_counter())

    def finish(self, ref) -> tuple | None:
        """(task id, result) of a finished call, or None when its actor failed and the task was put back. When the
        call returned several refs, the result is (the first one's value, the other refs)."""
        a, tid, task, passed, submitted = self.pending.pop(ref)
        try:
            value = driver_get(ref)
        except RECOVERABLE as err:
            self.failures += 1
            if self.failures > self.max_failures:
                raise RuntimeError(f"{self.what}: {self.failures} actor failures in one call, more than "
                                   f"{self.max_failures}; giving up") from err
            log.warning("%s actor %d failed (%s); recovering it and resubmitting task %s", self.what, a,
                        type(err).__name__, tid)
            self.recover(a)
            self.todo.appendleft((tid, task))
            self.free.append(a)
            return None
        done = time.perf_counter()
        self.free.append(a)
        self.busy_s += done - submitted
        self.spans[tid] = (submitted, done)
        return tid, ((value, *passed) if passed else value)


def run_pools(pools: list[Pool], on_result: Callable[[Pool, Any, Any], None], timeout_s: float) -> None:
    """Run every pool's tasks to the end, waiting once per completion (`ray.wait` over all pools' calls);
    `on_result(pool, task_id, result)` may add tasks to any pool (the next stage of the same work)."""
    while not all(p.idle for p in pools):
        for p in pools:
            p.launch()
        owner = {ref: p for p in pools for ref in p.pending}
        if not owner:
            raise RuntimeError("tasks are queued but no pool has an actor to run them")
        done, _ = ray.wait(list(owner), num_returns=1, timeout=timeout_s)
        if not done:
            busy = "; ".join(f"{len(p.pending)} {p.what} call(s) outstanding on actors "
                             f"{sorted({v[0] for v in p.pending.values()})}, {len(p.todo)} not started"
                             for p in pools if not p.idle)
            raise TimeoutError(f"no call finished within {timeout_s:.0f}s (rollout.timeout_s): {busy}")
        for ref in done:
            pool = owner[ref]
            got = pool.finish(ref)
            if got is not None:
                on_result(pool, *got)


def dispatch(actors: list, tasks: list, submit: Callable[[Any, Any], ray.ObjectRef],
             recover: Callable[[int], None], timeout_s: float, max_failures: int, what: str) -> tuple[list, int]:
    """Run every task on some actor; returns (results in task order, number of recovered failures). When `submit`
    returns several refs, a task's result is (the first one's value, the other refs)."""
    pool = Pool(what, actors, submit, recover, max_failures)
    for t, task in enumerate(tasks):
        pool.add(t, task)
    results: list = [None] * len(tasks)
    run_pools([pool], lambda _, t, value: results.__setitem__(t, value), timeout_s)
    return results, pool.failures


def call_when_back(make_call: Callable[[], ray.ObjectRef], timeout_s: float, what: str):
    """`ray.get(make_call())`, retried while the actor is still restarting (ActorUnavailableError), up to
    `timeout_s`; a permanently dead actor raises at once with a message naming it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return driver_get(make_call(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come back within {timeout_s:.0f}s") from None
            time.sleep(0.5)
        except ray.exceptions.ActorDiedError as err:
            raise RuntimeError(f"{what} died and will not restart (rollout.max_restarts exhausted)") from err
