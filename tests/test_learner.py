"""The learner's update in one process (real DeepSpeed over gloo, world size 1), on a real branching rollout."""


import pytest
import torch

from drm_ray.algorithms.losses import clipped_policy_loss
from drm_ray.algorithms.rl_batch import IterationLayout, learner_batch, minibatch_shards, select_states
from drm_ray.config import SD3_LORA_TARGETS
from drm_ray.data.prompt_table import encode_prompt_table
from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.models.lora import add_lora, load_lora_state, lora_state
from drm_ray.models.sd3 import build_tiny
from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine
from drm_ray.workers.learner import split_micro_batches, state_losses, train_iteration, train_update
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
    assert out["train/ratio_max_dev"] == 0.0 and out["train/ratio_mean"] == 1.0  # on-policy: rho = 1 exactly
    assert out["train/rollout_logp_dev"] < 1e-4  # the rollout's log-probs agree with the learner's forward
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


def _engine(transformer, grad_accum, lr=1e-3):
    params = add_lora(transformer, LORA["rank"], LORA["alpha"], SD3_LORA_TARGETS)
    engine, _ = init_engine(transformer, params, lr, 0.0, deepspeed_config(4, grad_accum, 1, 2, False, 1e6))
    return engine, params


def test_several_updates_per_batch(process_group):
    """grpo.updates_per_iter: one optimizer step per minibatch; ratio 1 on the first, not on the later ones."""
    prompts = encode_prompt_table(["a red circle", "a blue square"], "", "tiny", KWARGS)
    rollouts = _rollouts("step_grpo", prompts)
    g = torch.Generator().manual_seed(1)
    child = [torch.randn(r.children.shape[:2], generator=g) for r in rollouts]
    batch, _ = learner_batch(rollouts, "step_grpo", child, torch.randn(2, 3, generator=g), 3, 5.0)
    shards, totals = minibatch_shards(batch, IterationLayout(groups=2, per_group=3, updates=2))
    assert totals == [3, 3] and len(shards) == 1 and len(shards[0]) == 2  # one prompt group per minibatch
    dealt = torch.cat([cell["state_index"] for mb in shards[0] for cell in mb])
    assert torch.equal(dealt, batch["state_index"])  # every state once, in group order
    transformer = build_tiny(seed=0, text=False, vae=False).transformer
    engine, _ = _engine(transformer, grad_accum=1, lr=1e-2)
    sigmas = schedule_sigmas(build_tiny(text=False, vae=False).scheduler, 4)
    cfg = {**CFG, "grad_accum": 1, "clip_eps": 0.2}
    before = lora_state(transformer)
    steps = []
    orig = engine.step
    engine.step = lambda: (steps.append(1), orig())[1]
    out = train_iteration(engine, transformer, shards[0], totals, 1, prompts, sigmas, cfg)
    assert len(steps) == 2  # one optimizer step per minibatch (grad_accum 1)
    assert out["train/mb0/ratio_max_dev"] == 0.0  # the policy that sampled the batch: exactly on-policy
    assert out["train/mb1/ratio_max_dev"] > 1e-6
    assert out["train/states"] == 6 and any(not torch.equal(before[k], v) for k, v in lora_state(transformer).items())


def test_minibatches_do_not_depend_on_the_number_of_ranks():
    batch = {"state_index": torch.arange(15), "advantages": torch.randn(15, 2)}  # 5 groups of 3 states
    one, totals = minibatch_shards(batch, IterationLayout(groups=5, per_group=3, updates=3, world=1, accum=1))
    two, totals2 = minibatch_shards(batch, IterationLayout(groups=5, per_group=3, updates=3, world=2, accum=1))
    assert totals == totals2 == [6, 3, 6]  # whole groups: 2, 1, 2 (linspace(0, 5, 4) rounded: 0, 2, 3, 5)
    assert [mb[0]["state_index"].tolist() for mb in one[0]] == [[0, 1, 2, 3, 4, 5], [6, 7, 8],
                                                                 [9, 10, 11, 12, 13, 14]]
    for j in range(3):
        assert torch.equal(one[0][j][0]["state_index"],
                           torch.cat([two[0][j][0]["state_index"], two[1][j][0]["state_index"]]))


def test_layout_cells_do_not_depend_on_dropped_groups():
    """Cell boundaries come from group numbers alone: dropping a group empties its states from the cells it was in
    and moves nothing else (so a cell can be dealt before the other groups are scored)."""
    lay = IterationLayout(groups=4, per_group=2, updates=2, world=2, accum=2)
    full = {"state_index": torch.arange(8), "advantages": torch.arange(8.0)[:, None]}
    dropped = {k: v[torch.arange(8) // 2 != 1] for k, v in full.items()}  # group 1 (states 2, 3) dropped
    cells, totals = minibatch_shards(full, lay)
    cells_d, totals_d = minibatch_shards(dropped, lay)
    assert totals == totals_d == [4, 4]  # the normalizer counts the dropped group (zero advantage, as Flow-GRPO)
    # minibatch 0 = groups 0, 1 = states 0..3 in 2 rows x 2 ranks of one state each: row a, rank r = state 2a + r
    assert [[cells[r][0][a]["state_index"].tolist() for a in range(2)] for r in range(2)] == [[[0], [2]], [[1], [3]]]
    assert [[cells_d[r][0][a]["state_index"].tolist() for a in range(2)] for r in range(2)] == [[[0], []], [[1], []]]
    assert all(torch.equal(cells[r][1][a]["state_index"], cells_d[r][1][a]["state_index"])
               for r in range(2) for a in range(2))
    assert lay.row_groups(0, 0) == (0, 1) and lay.row_groups(0, 1) == (1, 2) and lay.row_groups(1, 1) == (3, 4)


def test_clipped_children_contribute_no_gradient():
    """PPO clipping, checked against a gradient computed by hand: log p_i = w * x_i, so d(rho_i)/dw = rho_i x_i."""
    w = torch.tensor(0.3, requires_grad=True)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    old = torch.tensor([[0.0, -0.3, 0.2, 0.0]])  # rho = exp(0.3 x - old): 1.35, 0.74, 0.95, 2.46
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.5]])
    eps = 0.2
    loss, stats = clipped_policy_loss(w * x, old, adv, eps)
    loss.mean().backward()
    rho = torch.exp(0.3 * x - old)
    # clipped side: A > 0 and rho > 1 + eps (child 0), A < 0 and rho < 1 - eps (child 1): no gradient;
    # child 2 is inside the range; child 3 (A < 0, rho > 1 + eps) is outside but on the unclipped side
    active = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    by_hand = (-(adv * rho * x) * active).sum() / 4
    assert w.grad.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert stats["clipped"].tolist() == [[1.0, 1.0, 0.0, 1.0]]  # outside the range, whichever side


def test_micro_batch_weighting_matches_one_batch_gradient(process_group):
    """The gradient DeepSpeed accumulates over micro-batches equals autograd's gradient of the mean per-state loss
    over the whole batch in one plain forward (no engine)."""
    prompts = encode_prompt_table(["a red circle", "a blue square"], "", "tiny", KWARGS)
    rollouts = _rollouts("grpo", prompts)
    g = torch.Generator().manual_seed(2)
    batch, _ = learner_batch(rollouts, "grpo", [], torch.randn(2, 3, generator=g), 3, 5.0)
    batch = {k: v[:7] for k, v in batch.items()}  # 7 states: micro-batches of 3, 2, 2 with grad_accum 3
    sigmas = schedule_sigmas(build_tiny(text=False, vae=False).scheduler, 4)

    reference = build_tiny(seed=0, text=False, vae=False).transformer
    params = add_lora(reference, LORA["rank"], LORA["alpha"], SD3_LORA_TARGETS)
    torch.manual_seed(0)
    for p in params:  # a non-zero adapter, so the KL term has a gradient too
        p.data.normal_(0, 0.02)
    start = {k: v.clone() for k, v in lora_state(reference).items()}
    per_state, _ = state_losses(reference, reference, batch, prompts, sigmas, CFG)
    per_state.mean().backward()
    ref_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()

    norms = []
    for accum in (1, 3):
        transformer = build_tiny(seed=0, text=False, vae=False).transformer
        engine, _ = _engine(transformer, grad_accum=accum)
        load_lora_state(transformer, start)
        train_update(engine, transformer, batch, 7, 1, prompts, sigmas, {**CFG, "grad_accum": accum})
        norms.append(engine.get_global_grad_norm())
    assert norms[0] == pytest.approx(ref_norm, rel=1e-4)
    assert norms[1] == pytest.approx(ref_norm, rel=1e-4)


def test_coordinator_deals_each_cell_once_its_groups_are_scored():
    """The pipelined schedule's dealing: chunks arrive out of order (and one twice); a cell is dealt only when every
    group it covers is in, in (minibatch, row) order, and the cells are those of the whole batch dealt at once."""
    import asyncio

    from drm_ray.workers.coordinator import Coordinator

    lay = IterationLayout(groups=6, per_group=2, updates=2, world=2, accum=2)  # chunks of 2 groups = 4 states
    batch = {"state_index": torch.arange(12), "advantages": torch.randn(12, 3)}
    batch = {k: v[torch.arange(12) // 2 != 4] for k, v in batch.items()}  # group 4 dropped (a NaN score)
    parts = [{"group": 2 * c, "groups": 2, "state": 4 * c, "states": 4,
              "rows": select_states(batch, 4 * c, 4 * c + 4), "latents": [f"ref{c}"]} for c in range(3)]

    async def scenario():
        co = Coordinator(world_size=2)
        await co.started(0, [None], {})
        dealt = lambda: [q.qsize() for q in co.queues]  # noqa: E731
        await co.submit(0, lay, None, [parts[1]])  # groups 2, 3: nothing of minibatch 0 row 0 (groups 0, 1)
        assert dealt() == [0, 0]
        await co.submit(0, lay, None, [parts[0]])  # minibatch 0 (groups 0-2) complete: both rows
        assert dealt() == [2, 2]
        await co.submit(0, lay, None, [parts[0]])  # a duplicate changes nothing
        assert dealt() == [2, 2]
        await co.submit(0, lay, None, [parts[2]])
        assert dealt() == [4, 4]
        return [[await q.get() for _ in range(4)] for q in co.queues]

    got = asyncio.run(scenario())
    want, totals = minibatch_shards(batch, lay)
    for rank in range(2):
        order = [(w["minibatch"], w["row"]) for w in got[rank]]
        assert order == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for w in got[rank]:
            expect = want[rank][w["minibatch"]][w["row"]]
            assert torch.equal(w["cell"]["state_index"], expect["state_index"])
            assert torch.equal(w["cell"]["advantages"], expect["advantages"])
            assert w["total"] == totals[w["minibatch"]] == 6
            # the latent chunks named are exactly those holding the cell's states
            assert sorted(s[0] for s in w["sources"]) == sorted({int(i) // 4 * 4 for i in expect["state_index"]})


def test_shared_initial_noise_gives_a_group_one_x1_and_its_own_sde_noise():
    prompts = encode_prompt_table(["a red circle", "a blue square"], "", "tiny", KWARGS)
    groups = [(0, 0, 11), (1, 1, 12)]
    own = RolloutWorker("tiny", KWARGS, LORA, prompts, SAMPLING, algo="grpo").rollout(groups, version=-1)
    shared = RolloutWorker("tiny", KWARGS, LORA, prompts, {**SAMPLING, "shared_initial_noise": True},
                           algo="grpo").rollout(groups, version=-1)
    steps = len(SAMPLING["branch_steps"])
    for a, b in zip(own, shared):
        x1_own, x1_shared = a.states[::steps], b.states[::steps]  # each trajectory's state at step 0: x_1, [k, ...]
        assert all(not torch.equal(x1_own[0], x) for x in x1_own[1:])  # default: one x_1 per trajectory
        assert all(torch.equal(x1_shared[0], x) for x in x1_shared[1:])  # shared: one per group
        assert torch.equal(x1_shared[0], x1_own[0])  # the first trajectory's generator draws it either way
        assert all(not torch.equal(b.final[0], f) for f in b.final[1:])  # the SDE noise still differs
    assert not torch.equal(shared[0].states[0], shared[1].states[0])  # groups still differ
