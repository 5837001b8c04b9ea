"""Bad input fails early with a message that names the problem (the Parquet cases live in test_data_*.py)."""

import pytest
import torch

from drm_ray.algorithms.rl_batch import learner_batch
from drm_ray.config import SD3_LORA_TARGETS
from drm_ray.data.prompts import PromptFileError, load_prompts
from drm_ray.reward.model import build_drm
from drm_ray.models.lora import add_lora, load_lora_state, lora_state
from drm_ray.models.sd3 import build_tiny
from drm_ray.tracking import redact
from drm_ray.workers.rollout import GroupRollout


def test_prompt_files(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PromptFileError, match="not a readable Parquet"):
        load_prompts(tmp_path / "bad.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(tmp_path / "latin1.txt")


def test_lora_state_with_wrong_keys_shapes_or_values():
    transformer = build_tiny(seed=0, text=False, vae=False).transformer
    add_lora(transformer, 4, 8.0, SD3_LORA_TARGETS)
    good = lora_state(transformer)
    key = next(iter(good))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(transformer, {k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state(transformer, {**good, "transformer_blocks.9.attn.to_q.lora_A.weight": good[key]})
    with pytest.raises(ValueError, match="rank or width"):
        load_lora_state(transformer, {**good, key: torch.zeros(good[key].shape[0] + 1, good[key].shape[1])})
    with pytest.raises(ValueError, match="NaN or inf"):
        load_lora_state(transformer, {**good, key: torch.full_like(good[key], float("nan"))})
    with pytest.raises(ValueError, match="floating point"):
        load_lora_state(transformer, {**good, key: good[key].long()})
    load_lora_state(transformer, good)  # and the good one loads


def test_drm_that_does_not_match_the_policy():
    policy = dict(build_tiny(seed=0, text=False, vae=False).transformer.config)
    drm = build_drm(build_tiny(seed=0, num_attention_heads=4, text=False, vae=False).transformer, latent_size=8)
    drm.check_compatible(policy, 8)  # a wider DRM is fine: it embeds the same latents and prompts
    with pytest.raises(ValueError, match="in_channels is 16 in the DRM and 8 in the policy"):
        drm.check_compatible({**policy, "in_channels": 8}, 8)
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        drm.check_compatible({**policy, "pooled_projection_dim": 2048}, 8)


def _rollout(gid, k=3, steps=2):
    return GroupRollout(gid, gid, gid, 0, torch.zeros(steps, 16, 2, 2), torch.arange(steps),
                        torch.zeros(steps, k, 16, 2, 2), torch.zeros(steps, k), torch.zeros(1, 16, 2, 2))


def test_nan_and_inf_rewards_drop_their_group_and_never_reach_the_learner():
    rollouts = [_rollout(0), _rollout(1), _rollout(2)]
    child = [torch.randn(2, 3), torch.tensor([[1.0, float("nan"), 0.0], [1.0, 2.0, 3.0]]),
             torch.tensor([[float("inf"), 0.0, 0.0], [0.0, 0.0, float("-inf")]])]
    batch, stats = learner_batch(rollouts, "step_grpo", child, torch.zeros(3, 1), 2, 5.0)
    assert stats["adv/dropped_groups"] == 3 and stats["adv/kept_states"] == 3
    assert batch["states"].shape[0] == 3 and torch.isfinite(batch["advantages"]).all()
    # GRPO: one non-finite final reward drops that prompt's whole group of images
    grpo = [GroupRollout(g, g, g, 0, torch.zeros(4, 16, 2, 2), torch.arange(2).repeat(2),
                         torch.zeros(4, 1, 16, 2, 2), torch.zeros(4, 1), torch.zeros(2, 16, 2, 2)) for g in range(2)]
    batch, stats = learner_batch(grpo, "grpo", [], torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), 2, 5.0)
    assert batch["states"].shape[0] == 4 and torch.isfinite(batch["advantages"]).all()


def test_credentials_in_uris_are_redacted():
    assert redact("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert redact("https://user:tok@host/path and more") == "https://user:***@host/path and more"
