"""Step-wise Sampling on Ray actors gives the images of the in-process sampler, for 1 and 2 workers."""

import numpy as np
import pytest

from drm_ray.reward.model import build_drm
from drm_ray.models.sd3 import build_tiny
from drm_ray.sample_driver import plan_items, sample_local, sample_on_ray, start_actors, stop_actors
from drm_ray.data.prompt_table import encode_prompt_table
from drm_ray.workers.sampler import StepwiseSampler
from drm_ray.workers.scorer import RewardScorer

MODEL = dict(seed=0, num_layers=4, num_attention_heads=2, attention_head_dim=16, resolution=64,
             max_sequence_length=32, shift=3.0, path=None, dtype="float32")
SAMPLER = dict(preset="tiny", model_kwargs=MODEL, num_steps=3, k=3, noise_level=0.7, guidance_scale=4.5)


@pytest.mark.slow
def test_ray_mode_matches_local_mode(ray_session, tmp_path):
    ray = ray_session
    drm_dir = tmp_path / "drm"
    build_drm(build_tiny(seed=7, text=False, vae=False).transformer, latent_size=8, seed=7).save_pretrained(drm_dir)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    items = plan_items(prompts, seeds_per_prompt=1, base_seed=42)
    table = encode_prompt_table(prompts, "", "tiny", MODEL)
    rewards = dict(specs=["drm"], preset="tiny", drm_path=str(drm_dir))
    local = sample_local(StepwiseSampler(**SAMPLER, prompts=table, scorer=RewardScorer(prompts=table, **rewards)),
                         items, batch_size=2)

    workers, scorers = start_actors(SAMPLER, ray.put(table), rewards, num_workers=2, num_scorers=1, num_cpus=0.5,
                                    num_gpus=0, timeout_s=120)
    try:
        for n in (1, 2):
            remote = sample_on_ray(workers[:n], items, batch_size=2, timeout_s=120)
            assert [b.index for b in remote] == [[0, 1], [2]]
            for lb, rb in zip(local, remote):
                assert np.array_equal(lb.images, rb.images), f"{n} workers"
                np.testing.assert_array_equal(lb.step_scores, rb.step_scores)
                np.testing.assert_array_equal(lb.chosen, rb.chosen)
                np.testing.assert_array_equal(lb.final_score, rb.final_score)
        assert not np.isnan(local[0].step_scores).any() and local[0].step_scores.shape == (2, 2)
    finally:
        stop_actors(workers + scorers)
    assert ray.is_initialized()


@pytest.mark.slow
def test_actors_that_cannot_be_placed_time_out_with_a_clear_error(ray_session):
    # The session's Ray has no GPUs, so a num_gpus=1 actor is never scheduled: the wait must end, naming why.
    with pytest.raises(TimeoutError, match=r"not ready within rollout.timeout_s=2s.*GPUs"):
        start_actors({**SAMPLER, "k": 1}, None, None, num_workers=1, num_scorers=1, num_cpus=0.5, num_gpus=1,
                     timeout_s=2)
