"""Resume and fault injection on the tiny preset, through real local Ray, Ray Train and DeepSpeed.

Resume: 4 iterations straight and 2 + 2 with a stop in between give bit-identical LoRA weights: on CPU with one
thread every step is deterministic (per-group generators, a saved sampler position, DeepSpeed's optimizer state).
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

pytestmark = pytest.mark.slow


def _driver(out, drm_dir, *overrides):
    from drm_ray.driver import StepGRPODriver

    return StepGRPODriver(rl_config(out, drm_dir, *overrides))


# two minibatches per update (two optimizer steps): resume and replay must reproduce both, in order
UPDATES = "grpo.updates_per_iter=2"
RESUME = ("grpo.checkpoint_every=2", "grpo.eval_every=2", UPDATES)


@pytest.fixture(scope="module")
def first_two(ray_session, tmp_path_factory, tiny_drm_dir):
    """2 iterations, checkpointed at 2: the first half of the resumed run, and the uninterrupted run the learner
    failure is compared with (the LoRA does not depend on checkpoint, eval or learner-state settings).
    Returns (output dir, LoRA checksum after 2 updates)."""
    out = tmp_path_factory.mktemp("first_two")
    driver = _driver(out, tiny_drm_dir, "grpo.iterations=2", *RESUME)
    driver.run()
    return out, driver.final_lora_checksum


def test_resume_gives_the_same_lora_as_a_straight_run(ray_session, tmp_path, tiny_drm_dir, first_two):
    _driver(tmp_path / "straight", tiny_drm_dir, "grpo.iterations=4", *RESUME).run()
    resumed, _ = first_two
    staging_dir(resumed, 3)  # a checkpoint being written when the job was killed: must be ignored
    again = _driver(resumed, tiny_drm_dir, "grpo.iterations=4", *RESUME)
    assert again.iteration == 2 and again.version == 2 and again.sampler.drawn == 8
    again.run()
    a = load_file(latest_checkpoint(tmp_path / "straight") / "lora_state.safetensors")
    b = load_file(latest_checkpoint(resumed) / "lora_state.safetensors")
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


def test_learner_failure_between_state_saves_replays_to_the_same_lora(ray_session, tmp_path, tiny_drm_dir,
                                                                      first_two):
    # The Ray Train worker of rank 0 dies after update 1. With state_every=2 nothing newer than v0 is saved: the
    # restarted group restores v0, the driver re-sends updates 0 and 1 in order, and the result equals an
    # uninterrupted run's bit for bit. (state_every=1 is the special case that re-sends only the unacknowledged one.)
    driver = _driver(tmp_path / "killed", tiny_drm_dir, "grpo.iterations=2", "learner.max_failures=1",
                     "learner.state_every=2", UPDATES)
    driver.step()
    members = ray.get(driver.rl.learner.coordinator.get_members.remote())
    os.kill(members[0]["pid"], signal.SIGKILL)
    time.sleep(1.0)
    metrics = driver.step()
    assert metrics["train/learner_restarts"] >= 1 and driver.version == 2
    assert metrics["train/rollout_logp_dev"] < 1e-4 and metrics["train/mb0/ratio_max_dev"] == 0.0
    assert metrics["train/mb1/ratio_max_dev"] > 0.0  # the second minibatch runs after the first step
    events = ray.get(driver.rl.learner.coordinator.get_events.remote())
    assert ray.get(driver.rl.learner.coordinator.get_members.remote())[0]["pid"] != members[0]["pid"]
    assert "generation 2 started at v0" in events, events
    after = events[events.index("generation 2 started at v0"):]
    submits = [e for e in after if e.startswith("submit")]
    assert submits[0] == "submit v0: 2 chunk(s) in (generation 2)", after  # the replay starts from the restored v0
    driver.finish()
    assert driver.final_lora_checksum == first_two[1]
