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


def dispatch(actors: list, tasks: list, submit: Callable[[Any, Any], ray.ObjectRef],
             recover: Callable[[int], None], timeout_s: float, max_failures: int, what: str) -> tuple[list, int]:
    """Run every task on some actor; returns (results in task order, number of recovered failures). When `submit`
    returns several refs, a task's result is (the first one's value, the other refs)."""
    todo, free = deque(range(len(tasks))), deque(range(len(actors)))
    pending: dict[ray.ObjectRef, tuple[int, int]] = {}
    results: list = [None] * len(tasks)
    failures = 0
    while todo or pending:
        while free and todo:
            a, t = free.popleft(), todo.popleft()
            refs = submit(actors[a], tasks[t])
            refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
            pending[refs[0]] = (a, t, refs[1:])
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
        if not done:
            busy = sorted({a for a, _, _ in pending.values()})
            raise TimeoutError(f"no {what} call finished within {timeout_s:.0f}s (rollout.timeout_s); "
                               f"{len(pending)} outstanding on actors {busy}, {len(todo)} not started")
        for ref in done:
            a, t, passed = pending.pop(ref)
            try:
                results[t] = (driver_get(ref), *passed) if passed else driver_get(ref)
            except RECOVERABLE as err:
                failures += 1
                if failures > max_failures:
                    raise RuntimeError(f"{what}: {failures} actor failures in one call, more than "
                                       f"{max_failures}; giving up") from err
                log.warning("%s actor %d failed (%s); recovering it and resubmitting task %d", what, a,
                            type(err).__name__, t)
                recover(a)
                todo.appendleft(t)
            free.append(a)
    return results, failures


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
