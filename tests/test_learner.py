"""The learner's update in one process (real DeepSpeed over gloo, world size 1), on a real branching rollout."""


import pytest
import torch

from drm_ray.algorithms.rl_batch import learner_batch
from drm_ray.config import SD3_LORA_TARGETS
from drm_ray.data.prompt_table import encode_prompt_table
from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.models.lora import add_lora, lora_state
from drm_ray.models.sd3 import build_tiny
from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine
from drm_ray.workers.learner import split_micro_batches, state_losses, train_update
from drm_ray.workers.rollout import RolloutWorker

KWARGS = dict(path=None, dtype="float32", seed=0, num_layers=4, num_attention_heads=2, attention_head_dim=16,
              resolution=64, max_sequence_length=32, shift=3.0)
SAMPLING = dict(num_steps=4, guidance_scale=4.5, noise_level=0.7, k=3, branch_steps=[0, 1, 2], continuation="random")
LORA = dict(rank=4, alpha=8.0, target_modules=list(SD3_LORA_TARGETS))
CFG = dict(grad_accum=2, guidance_scale=4.5, noise_level=0.7, clip_eps=1e-4, beta=0.004)




def _rollouts(algo, prompts):
    worker = RolloutWorker("tiny", KWARGS, LORA, prompts, SAMPLING, algo=algo)
    return worker.rollout([(0, 0, 11), (1, 1, 12)], version=-1)  # no LoRA loaded yet: v-1


@pytest.mark.parametrize("algo", ["step_grpo", "grpo"])
def test_update_is_on_policy_changes_lora_only(process_group, algo):
    prompts = encode_prompt_table(["a red circle", "a blue square"], "", "tiny", KWARGS)
    rollouts = _rollouts(algo, prompts)
    g = torch.Generator().manual_seed(0)
    child = [torch.randn(r.children.shape[:2], generator=g) for r in rollouts]  # stand-in DRM scores
    final = torch.randn(2, rollouts[0].final.shape[0], generator=g)
    batch, stats = learner_batch(rollouts, algo, child, final, 3, 5.0)
    m = 3 if algo == "step_grpo" else 1
    assert batch["children"].shape[1] == m and batch["states"].shape[0] == (6 if algo == "step_grpo" else 18)

    transformer = build_tiny(seed=0, text=False, vae=False).transformer
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    params = add_lora(transformer, LORA["rank"], LORA["alpha"], SD3_LORA_TARGETS)
    before = lora_state(transformer)
    engine, _ = init_engine(transformer, params, 1e-3, 0.0, deepspeed_config(4, 2, 1, 2, False, 1.0))
    sigmas = schedule_sigmas(build_tiny(text=False, vae=False).scheduler, 4)
    out = train_update(engine, transformer, batch, batch["states"].shape[0], 1, prompts, sigmas, CFG)
    assert out["train/ratio_max_dev"] < 1e-4 and out["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert out["train/kl_ref"] == pytest.approx(0.0, abs=1e-12)  # B = 0: policy equals reference before the step
    after = lora_state(transformer)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the update did not change the LoRA"
    for name, value in transformer.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    # the step moved the policy toward the children with positive advantages and away from the others:
    # sum_i A_i log(rho_i) > 0 under the updated policy (first order: the step descends -sum A rho)
    with torch.no_grad():
        _, after_step = state_losses(engine, transformer, batch, prompts, sigmas, CFG)
    moved = (batch["advantages"] * after_step["ratio"].log()).sum()
    assert moved > 0, moved


def test_micro_batches_cover_the_shard_exactly():
    shard = {"states": torch.arange(7).view(7, 1), "step_index": torch.arange(7)}
    parts = split_micro_batches(shard, 3)
    assert len(parts) == 3 and torch.equal(torch.cat([p["states"] for p in parts]), shard["states"])
    empty = split_micro_batches({"states": torch.zeros(1, 1), "step_index": torch.zeros(1)}, 3)
    assert [p["states"].shape[0] for p in empty].count(0) == 2  # still 3 micro-batches: 3 backward calls
