"""Step-GRPO on a local multi-node Ray (`ray.cluster_utils.Cluster`): roles land on the nodes their custom resources
name, demands the cluster can never meet fail at once, and an autoscaling wait ends when a node arrives.

The cluster runs in a subprocess (this file run as a script): the session's `ray_session` is a single local Ray, and
one process can be connected to one Ray only. The subprocess gets its own RAY_TMPDIR, so the cluster's address file
(`<tmp>/ray/ray_current_cluster`) never points another process's plain `ray.init()` at it.

Layout: head with 0 CPUs (runs the driver only), a "rollout" node ({"rollout": 2}: one DRM scorer + one rollout
worker, each asking rollout=1) and a "learner" node ({"learner": 1}: the Ray Train worker).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_roles_are_placed_by_custom_resources_on_a_multinode_cluster(tmp_path):
    tmpdir = tempfile.mkdtemp(prefix="drmc", dir="/tmp")  # short: Ray's socket paths live under it (107-byte cap)
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=540)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"multi-node subprocess took {time.monotonic() - start:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))

    # a demand the fixed cluster can never meet fails in the driver's set-up (MLflow included), long before any
    # wait on actors (rollout.timeout_s = 600 s), naming the role, the demand and what the cluster has
    assert report["fixed"]["seconds"] < 60
    message = report["fixed"]["error"]
    assert "fixed-size cluster" in message, message
    assert "need 3 rollout for reward scorers 1 x 1, rollout workers 2 x 1 (have 2)" in message, message
    # the job placed each role where its custom resource is, and the learner's placement group packs
    nodes = report["nodes"]
    placed = report["actors"]
    assert placed["RewardScorer"] == [nodes["rollout"]], placed
    assert placed["RolloutWorker"] == [nodes["rollout"]], placed
    assert placed["RayTrainWorker"] == [nodes["learner"]], placed
    assert report["learner_pg_strategies"] == ["PACK"], report["learner_pg_strategies"]
    assert report["summary"]["iteration"] == 1 and report["lora_saved"]
    # autoscaling: the wait says what it waits for, and ends when a node with the missing resource joins
    assert any("waiting for 3 rollout for reward scorers 1 x 1, rollout workers 2 x 1 (have 2)" in line
               for line in report["wait"]["log"]), report["wait"]["log"]
    assert report["wait"]["ok"] and report["wait"]["seconds"] < 60
    # ... and gives up clearly when nothing comes
    assert "did not provide" in report["timeout"]["error"] and "rollout.autoscale_wait_s = 1.5s" in \
           report["timeout"]["error"]
    assert report["timeout"]["seconds"] < 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from drm_ray.config import load_config
    from drm_ray.driver import StepGRPODriver
    from drm_ray.reward.model import build_drm
    from drm_ray.models.sd3 import build_tiny
    from drm_ray.placement import ClusterResourcesError, ensure_resources, role_demands

    drm = out / "drm"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8).save_pretrained(drm)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})  # the state API needs the dashboard; defaults may be taken
    try:
        rollout_node = cluster.add_node(num_cpus=1, resources={"rollout": 2})
        learner_node = cluster.add_node(num_cpus=1, resources={"learner": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        report = {"nodes": {"rollout": rollout_node.node_id, "learner": learner_node.node_id}}

        def cfg(*extra):
            return load_config("tiny", [f"run.output_dir={out / 'run'}", f"reward.drm_path={drm}",
                                        "grpo.iterations=1", "grpo.eval_every=100", "rollout.resources=[rollout=1]",
                                        "learner.resources=[learner=1]", *extra], job="step_grpo")

        t0 = time.monotonic()
        try:
            StepGRPODriver(cfg("rollout.num_workers=2"))
            raise AssertionError("a demand of 3 rollout on a cluster with 2 was accepted")
        except ClusterResourcesError as err:
            report["fixed"] = {"error": str(err), "seconds": time.monotonic() - t0}

        driver = StepGRPODriver(cfg())
        driver.run()
        report["summary"] = {"iteration": driver.iteration}
        report["lora_saved"] = (out / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
        placed: dict[str, list[str]] = {}
        for a in list_actors(address=cluster.address, limit=1000):
            placed.setdefault(a.class_name, []).append(a.node_id)
        report["actors"] = {k: sorted(set(v)) for k, v in placed.items()}
        report["learner_pg_strategies"] = sorted({pg["strategy"] for pg in ray.util.placement_group_table().values()
                                                  if any("learner" in b for b in pg["bundles"].values())})

        log: list[str] = []
        demands = role_demands(cfg("rollout.num_workers=2", "rollout.autoscale_wait_s=60"))
        result: dict = {}

        def wait():
            t = time.monotonic()
            ensure_resources(demands, 60, poll_s=0.5, log=lambda m, **_: log.append(m))
            result.update(ok=True, seconds=time.monotonic() - t)

        waiter = threading.Thread(target=wait)
        waiter.start()
        # Play the autoscaler: a node with the missing resource joins during the wait (from the main thread:
        # starting a node installs signal handlers).
        time.sleep(1.0)
        cluster.add_node(num_cpus=1, resources={"rollout": 1})
        waiter.join(timeout=90)
        report["wait"] = {"ok": result.get("ok", False), "log": log, "seconds": result.get("seconds")}

        t0 = time.monotonic()
        try:
            ensure_resources(role_demands(cfg("rollout.num_workers=9")), 1.5, poll_s=0.5, log=lambda m, **_: None)
        except ClusterResourcesError as err:
            report["timeout"] = {"error": str(err), "seconds": time.monotonic() - t0}
        print(json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
