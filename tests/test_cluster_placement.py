"""Resource demand per role and the checks that run before any actor is created (drm_ray/placement.py), on
hand-written node lists: no Ray needed. The same checks on a real multi-node Ray: test_cluster_multinode.py."""

import time

import pytest

from drm_ray.config import ConfigError, load_config
from drm_ray.placement import (ClusterResourcesError, ensure_resources, learner_worker_resources, role_demands,
                               rollout_actor_options, shortfalls)

GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "rollout": 1.0}
LEARNER_NODE = {"CPU": 48.0, "GPU": 4.0, "learner": 4.0}
HEAD = {"node:__internal_head__": 1.0, "memory": 1e10}  # CPU 0: Ray leaves the key out


def test_demands_come_from_the_same_options_the_actors_get():
    cfg = load_config("sd35m", ["rollout.num_workers=3", "rollout.resources=[rollout=1, big_mem=0.5]"])
    options = rollout_actor_options(cfg.rollout)
    assert options == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"rollout": 1.0, "big_mem": 0.5},
                       "scheduling_strategy": "SPREAD"}
    assert learner_worker_resources(cfg.learner) == {"CPU": 4.0, "GPU": 1.0, "learner": 1.0}
    demands = {d.role: (d.count, d.bundle) for d in role_demands(cfg)}
    assert demands == {"reward scorers": (1, {"CPU": 4.0, "GPU": 1.0, "rollout": 1.0, "big_mem": 0.5}),
                       "rollout workers": (3, {"CPU": 4.0, "GPU": 1.0, "rollout": 1.0, "big_mem": 0.5}),
                       "judge scorer": (0, {"CPU": 4.0, "GPU": 1.0, "rollout": 1.0, "big_mem": 0.5}),
                       "learner workers": (2, {"CPU": 4.0, "GPU": 1.0, "learner": 1.0})}
    judged = {d.role: d.count for d in role_demands(load_config("sd35m", ["reward.judges=[clip]",
                                                                          "reward.clip_path=/models/pickscore"]))}
    assert judged["judge scorer"] == 1  # the judges' actor is placed like a scorer
    tiny = {d.role: d.bundle for d in role_demands(load_config("tiny"))}
    assert tiny["rollout workers"] == {"CPU": 0.25} and tiny["learner workers"] == {"CPU": 0.5}  # zeros dropped


def test_shortfalls_name_the_role_the_demand_and_the_supply():
    sd35m = role_demands(load_config("sd35m"))
    assert shortfalls(sd35m, [HEAD] + [GPU_NODE] * 5 + [LEARNER_NODE]) == []
    # 4 rollout nodes for 1 scorer + 4 workers: 5 rollout (and GPUs) needed
    problems = shortfalls(sd35m, [HEAD] + [GPU_NODE] * 4 + [LEARNER_NODE])
    assert problems == ["need 5 rollout for reward scorers 1 x 1, rollout workers 4 x 1 (have 4)"]
    # enough GPUs in total, but no node offers the learner's custom resource
    problems = shortfalls(sd35m, [HEAD] + [GPU_NODE] * 7)
    assert problems[0].startswith("learner workers: one actor needs {CPU: 4, GPU: 1, learner: 1} on a single node")
    assert problems[1] == "need 2 learner for learner workers 2 x 1 (have 0)"
    # each actor must fit on one node: two half-nodes are not one node
    big = role_demands(load_config("sd35m", ["rollout.num_cpus=12"]))
    assert any(p.startswith("reward scorers: one actor needs {CPU: 12, GPU: 1, rollout: 1}")
               for p in shortfalls(big, [HEAD] + [GPU_NODE] * 5 + [LEARNER_NODE]))


def test_a_fixed_cluster_fails_at_once_and_an_autoscaling_one_is_not_asked_when_nothing_is_missing():
    sd35m = role_demands(load_config("sd35m"))
    calls = []

    def nodes():
        calls.append(1)
        return [HEAD, GPU_NODE, GPU_NODE, LEARNER_NODE]

    start = time.monotonic()
    with pytest.raises(ClusterResourcesError) as err:
        ensure_resources(sd35m, autoscale_wait_s=0, nodes_fn=nodes)
    assert time.monotonic() - start < 1 and len(calls) == 1  # no waiting, no polling
    message = str(err.value)
    assert "fixed-size cluster" in message and "need 7 GPU for reward scorers 1 x 1, rollout workers 4 x 1, " \
           "learner workers 2 x 1 (have 6)" in message and "rollout.autoscale_wait_s" in message
    # nothing missing: returns without touching the autoscaler (which would need a running Ray)
    ensure_resources(sd35m, autoscale_wait_s=60, nodes_fn=lambda: [HEAD] + [GPU_NODE] * 5 + [LEARNER_NODE])


@pytest.mark.parametrize("override, bad", [
    ("rollout.resources=[GPU=1]", "rollout.resources = 'GPU=1'"),
    ("learner.resources=[learner]", "learner.resources = 'learner'"),
    ("learner.resources=[learner=0]", "learner.resources = 'learner=0'"),
    ("rollout.resources=[rollout=-1]", "rollout.resources = 'rollout=-1'"),
    ("rollout.autoscale_wait_s=-5", "rollout.autoscale_wait_s = -5.0"),
])
def test_placement_fields_are_validated(override, bad):
    with pytest.raises(ConfigError, match=bad.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", [override])
