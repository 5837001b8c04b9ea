"""Resume and fault injection on the tiny preset, through real local Ray, Ray Train and DeepSpeed.

Resume: 4 iterations straight and 2 + 2 with a stop in between give bit-identical LoRA weights: on CPU with one
thread every step is deterministic (per-group generators, a saved sampler position, DeepSpeed's optimizer state).
The first 2 of those are the run whose learner is killed and replayed, so 3 drivers cover resume and replay.
"""

import json
import os
import signal
import time

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import rl_config
from drm_ray.checkpoint import latest_checkpoint, staging_dir
from drm_ray.models.lora import lora_checksum

pytestmark = pytest.mark.slow


def _driver(out, drm_dir, *overrides):
    from drm_ray.driver import StepGRPODriver

    return StepGRPODriver(rl_config(out, drm_dir, *overrides))


# two minibatches per update (two optimizer steps): resume and replay must reproduce both, in order
RESUME = ("grpo.checkpoint_every=2", "grpo.eval_every=2", "grpo.updates_per_iter=2")
# a restarted learner group restores the newest state saved every 2 versions (the LoRA does not depend on it)
FAILURE = ("learner.max_failures=1", "learner.state_every=2")


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory, tiny_drm_dir):
    """4 iterations without a stop, checkpointed every 2: the reference of the replayed and the resumed runs."""
    out = tmp_path_factory.mktemp("straight")
    _driver(out, tiny_drm_dir, "grpo.iterations=4", *RESUME, *FAILURE).run()
    return out


def _lora_at(out, iteration):
    return load_file(out / "checkpoints" / f"iter-{iteration:06d}" / "lora_state.safetensors")


@pytest.fixture(scope="module")
def learner_failure(ray_session, tmp_path_factory, tiny_drm_dir):
    """The first half of `straight` (2 iterations, checkpointed at 2), whose Ray Train worker of rank 0 is killed
    after update 1. With state_every=2 nothing newer than v0 is saved: the restarted group restores v0 and the driver
    re-sends updates 0 and 1 in order. Returns (output dir, driver, the second iteration's metrics, the coordinator's
    members before the kill and after the replay, its events)."""
    out = tmp_path_factory.mktemp("learner_failure")
    driver = _driver(out, tiny_drm_dir, "grpo.iterations=2", *RESUME, *FAILURE)
    coordinator = driver.rl.learner.coordinator
    seen = {}
    step = driver.step

    def step_and_kill_rank0_after_the_first():
        metrics = step()
        if driver.iteration == 1:
            seen["before"] = ray.get(coordinator.get_members.remote())
            os.kill(seen["before"][0]["pid"], signal.SIGKILL)
            time.sleep(1.0)
        else:  # the learner group ends with the job: read it now
            seen["after"] = ray.get(coordinator.get_members.remote())
            seen["events"] = ray.get(coordinator.get_events.remote())
        return metrics

    driver.step = step_and_kill_rank0_after_the_first
    metrics = driver.run()
    return out, driver, metrics, seen


def test_learner_failure_between_state_saves_replays_to_the_same_lora(straight, learner_failure):
    out, driver, metrics, seen = learner_failure
    assert metrics["train/learner_restarts"] >= 1 and driver.version == 2
    assert metrics["train/rollout_logp_dev"] < 1e-4 and metrics["train/mb0/ratio_max_dev"] == 0.0
    assert metrics["train/mb1/ratio_max_dev"] > 0.0  # the second minibatch runs after the first step
    events = seen["events"]
    assert seen["after"][0]["pid"] != seen["before"][0]["pid"]
    assert "generation 2 started at v0" in events, events
    after = events[events.index("generation 2 started at v0"):]
    submits = [e for e in after if e.startswith("submit")]
    assert submits[0] == "submit v0: 2 chunk(s) in (generation 2)", after  # the replay starts from the restored v0
    # bit for bit the LoRA of the uninterrupted run after 2 updates (state_every=1 is the special case that re-sends
    # only the unacknowledged update)
    assert driver.final_lora_checksum == lora_checksum(_lora_at(straight, 2))


def test_resume_gives_the_same_lora_as_a_straight_run(ray_session, tiny_drm_dir, straight, learner_failure):
    resumed = learner_failure[0]  # a run that survived a learner failure, stopped after its checkpoint at 2
    staging_dir(resumed, 3)  # a checkpoint being written when the job was killed: must be ignored
    again = _driver(resumed, tiny_drm_dir, "grpo.iterations=4", *RESUME, *FAILURE)
    assert again.iteration == 2 and again.version == 2 and again.sampler.drawn == 8
    # the panel of iteration 0, before the failure, stays the over-optimization flag's reference after the resume
    assert again.eval_history[0]["iteration"] == 0 and again.first_panel is not None
    assert sum(again.first_panel["reward"]) / len(again.first_panel["reward"]) == pytest.approx(
        again.eval_history[0]["eval/reward"])
    again.run()
    a, b = _lora_at(straight, 4), _lora_at(resumed, 4)
    assert latest_checkpoint(resumed).name == "iter-000004"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same MLflow run continues: each step logged once
    runs = [json.loads((resumed / "summary.json").read_text())["mlflow_run_id"]]
    client = MlflowClient(f"sqlite:///{resumed / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("drm-ray").experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(runs[0], "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(runs[0], "eval/drm_score")) == [0, 2, 4]


def test_killed_rollout_worker_and_scorer_mid_iteration(ray_session, tmp_path, tiny_drm_dir, monkeypatch):
    import drm_ray.driver

    driver = _driver(tmp_path / "kill", tiny_drm_dir, "rollout.num_workers=2", "rollout.groups_per_call=1",
                     "grpo.iterations=2")
    # the rollout worker dies as the iteration's rollouts are sent, the scorer when the first chunk is handed to it
    # (the pipelined schedule: other chunks are still rolling out); Ray restarts both (max_restarts) and the driver
    # resubmits their unfinished work
    killed = []

    class KillScorerOnFirstChunk(drm_ray.driver.Pool):
        def add(self, task_id, task):
            if self.what == "scoring" and not killed:
                killed.append(task_id)
                ray.kill(driver.rl.scorers[0], no_restart=False)
            super().add(task_id, task)

    monkeypatch.setattr(drm_ray.driver, "Pool", KillScorerOnFirstChunk)
    ray.kill(driver.rl.workers[0], no_restart=False)
    first = driver.step()
    monkeypatch.undo()
    assert killed
    assert first["rollout/actor_restarts"] >= 1 and first["score/actor_restarts"] >= 1
    assert first["rollout/groups"] == 4 and first["train/states"] == 4 * 3  # no group lost or counted twice
    # the restarted worker reloaded the current LoRA before rolling out: its log-probs are the learner's
    assert first["train/rollout_logp_dev"] < 1e-4
    second = driver.step()
    assert second["rollout/groups"] == 4 and set(driver.worker_checksums) == {driver.worker_checksums[0]}
    driver.finish()
