"""Where the RL job's roles run, and whether the cluster can hold them, checked before any actor is created.

Three roles ask for resources: reward scorers (and one judge scorer when reward.judges is set) and rollout workers
(Ray actors, `rollout.num_cpus` / `num_gpus` / `resources` each) and learner workers (Ray Train workers,
`learner.num_cpus`, 1 GPU if `learner.use_gpu`, `learner.resources`). Custom resources pin a role to the node types
that offer them (`"rollout=1"` on nodes started with `--resources '{"rollout": 1}'`, as in cluster/). Scorers and
rollout workers are SPREAD over nodes (a lost node takes few of them, and no single node's PCIe or NIC carries every
worker's traffic); the learner's workers stay packed on as few nodes as possible (Ray Train's default placement group
strategy, PACK), since they all-reduce gradients every micro-step.

`ensure_resources` compares the demand with the nodes' total resources. It checks only necessary conditions (each
actor fits on some node; the sum per resource fits the cluster), so what it rejects can never run; fragmentation
beyond that is left to Ray and to `rollout.timeout_s`. On a fixed-size cluster (`rollout.autoscale_wait_s = 0`) a
shortfall fails at once; on an autoscaling cluster the demand is handed to the autoscaler (`request_resources`) and
the job waits, saying what it waits for, up to `rollout.autoscale_wait_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

EPS = 1e-6  # Ray accounts resources in units of 1e-4; anything below that is rounding


class ClusterResourcesError(RuntimeError):
    """The cluster cannot (or did not in time) offer what the job's roles ask for."""


@dataclass(frozen=True)
class RoleDemand:
    role: str                    # "rollout workers": how messages name it
    count: int                   # actors of this role
    bundle: dict[str, float]     # resources of one actor, zero entries dropped


def parse_resources(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """("rollout=1", "big_mem=0.5") -> {"rollout": 1.0, "big_mem": 0.5}; config.validate() has checked the form."""
    out: dict[str, float] = {}
    for item in items:
        name, _, amount = item.partition("=")
        out[name.strip()] = float(amount)
    return out


def rollout_actor_options(rollout) -> dict:
    """`ray.remote(...).options(**this)` for a reward scorer or a rollout worker (`rollout`: the RolloutConfig)."""
    return dict(num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus, resources=parse_resources(rollout.resources),
                scheduling_strategy="SPREAD")


def learner_worker_resources(learner) -> dict[str, float]:
    """Ray Train `resources_per_worker` of one learner worker (`learner`: the LearnerConfig)."""
    return {"CPU": learner.num_cpus, **({"GPU": 1.0} if learner.use_gpu else {}),
            **parse_resources(learner.resources)}


def role_demands(cfg) -> list[RoleDemand]:
    """The demand of each role, built from the same options the actors are created with."""
    ro = rollout_actor_options(cfg.rollout)
    actor = _nonzero({"CPU": ro["num_cpus"], "GPU": ro["num_gpus"], **ro["resources"]})
    return [RoleDemand("reward scorers", cfg.rollout.num_scorers, actor),
            RoleDemand("rollout workers", cfg.rollout.num_workers, actor),
            RoleDemand("judge scorer", 1 if cfg.reward.judges else 0, actor),
            RoleDemand("learner workers", cfg.learner.num_workers, _nonzero(learner_worker_resources(cfg.learner)))]


def shortfalls(demands: list[RoleDemand], nodes: list[dict[str, float]]) -> list[str]:
    """Why `demands` can never be placed on `nodes` (each node: its total resources); empty if they may be."""
    problems = []
    for d in demands:
        if d.count and not any(_fits(d.bundle, n) for n in nodes):
            problems.append(f"{d.role}: one actor needs {_fmt(d.bundle)} on a single node, and no node has that "
                            f"(nodes: {'; '.join(_fmt(n) for n in nodes) or 'none'})")
    have = _sum(nodes)
    need: dict[str, float] = {}
    for d in demands:
        for key, amount in d.bundle.items():
            need[key] = need.get(key, 0.0) + d.count * amount
    for key, amount in need.items():
        if amount > have.get(key, 0.0) + EPS:
            roles = ", ".join(f"{d.role} {d.count} x {d.bundle[key]:g}" for d in demands
                              if d.count and d.bundle.get(key))
            problems.append(f"need {amount:g} {key} for {roles} (have {have.get(key, 0.0):g})")
    return problems


def ensure_resources(demands: list[RoleDemand], autoscale_wait_s: float, poll_s: float = 2.0,
                     nodes_fn=None, log=print) -> None:
    """Return once the cluster's nodes can hold `demands`; raise ClusterResourcesError if they cannot (now, on a
    fixed-size cluster, or after `autoscale_wait_s` seconds on an autoscaling one)."""
    nodes_fn = nodes_fn or alive_node_resources
    problems = shortfalls(demands, nodes_fn())
    if not problems:
        return
    if autoscale_wait_s <= 0:
        raise ClusterResourcesError(
            "the Ray cluster can never place this job's actors (fixed-size cluster: rollout.autoscale_wait_s = 0):"
            + "".join(f"\n  - {p}" for p in problems) + f"\n{_HINT}; on an autoscaling cluster, set "
            "rollout.autoscale_wait_s > 0.")
    from ray.autoscaler.sdk import request_resources

    # The autoscaler adds nodes only for demand it can see; actors that are not created yet show none.
    request_resources(bundles=[dict(d.bundle) for d in demands for _ in range(d.count)])
    deadline, last = time.monotonic() + autoscale_wait_s, None
    try:
        while problems:
            if problems != last:  # say it once per change, not every poll
                log("[placement] " + "; ".join("waiting for " + p[5:] if p.startswith("need ") else p for p in problems)
                    + f" ... (autoscaling, up to {autoscale_wait_s:.0f}s)", flush=True)
                last = problems
            if time.monotonic() > deadline:
                raise ClusterResourcesError(
                    f"the autoscaler did not provide this job's resources within rollout.autoscale_wait_s = "
                    f"{autoscale_wait_s:g}s:" + "".join(f"\n  - {p}" for p in problems)
                    + f"\nCheck the node types' max_workers / maxReplicas and the cloud quota. {_HINT}.")
            time.sleep(poll_s)
            problems = shortfalls(demands, nodes_fn())
    finally:
        request_resources(bundles=[])  # the actors hold the resources from here on; keep no standing request
    log("[placement] the cluster now has the resources for every role", flush=True)


def alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


_HINT = ("Change rollout.num_workers / num_scorers / num_gpus / num_cpus / resources or learner.num_workers / "
         "num_cpus / use_gpu / resources, or add nodes that offer these resources (custom ones come from "
         "`ray start --resources`)")


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in bundle.items() if v}


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith("node:") and k not in ("memory", "object_store_memory") and v}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
