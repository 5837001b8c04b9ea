import math

import pytest
import torch

from drm_ray.algorithms.losses import accuracy_by_noise_bucket, bradley_terry_loss
from drm_ray.diffusion.flow import sample_noise_levels
from drm_ray.models.sd3 import build_tiny
from drm_ray.reward.model import DiffusionRewardModel, build_drm


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 8, 8, generator=g), torch.rand(n, generator=g), torch.randn(n, 109, 64, generator=g),
            torch.randn(n, 64, generator=g))


def test_output_shape_and_dropped_blocks_keep_source_weights():
    source = build_tiny(seed=0, text=False, vae=False).transformer
    reference = {k: v.clone() for k, v in source.state_dict().items()}
    drm = build_drm(source, n_drop=3, head="mlp", latent_size=8)
    assert len(drm.blocks) == source.config.num_layers - 3 == 1
    assert drm(*_inputs(5)).shape == (5,)
    # every kept weight equals the source transformer's weight of the same name
    kept = drm.state_dict()
    for name, value in kept.items():
        if name.startswith("head."):
            continue
        src_name = name.replace("blocks.", "transformer_blocks.", 1) if name.startswith("blocks.") else name
        assert torch.equal(value, reference[src_name]), name
    # and nothing of the dropped blocks or the output layers is carried along
    assert not any(k.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "norm_out", "proj_out")) for k in kept)


def test_random_init_differs_from_pretrained():
    pre = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, init="pretrained")
    rnd = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, init="random", seed=1)
    assert not torch.equal(pre.blocks[0].attn.to_q.weight, rnd.blocks[0].attn.to_q.weight)
    assert pre.blocks[0].attn.to_q.weight.shape == rnd.blocks[0].attn.to_q.weight.shape


def test_mean_head_serves_any_resolution_and_mlp_head_checks():
    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, head="mean", latent_size=8)
    x, s, e, p = _inputs(2)
    assert drm(torch.randn(2, 16, 16, 16), s, e, p).shape == (2,)
    mlp = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, head="mlp", latent_size=8)
    with pytest.raises(ValueError, match="trained for 8x8"):
        mlp.check_compatible(dict(build_tiny(text=False, vae=False).transformer.config), latent_size=16)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        mlp.check_compatible({**mlp.transformer_config, "joint_attention_dim": 4096}, latent_size=8)


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8).eval()
    with torch.no_grad():
        for p in drm.head.parameters():
            p.add_(0.1)  # not the init values
        before = drm(*_inputs(4))
    path = drm.save_pretrained(tmp_path / "drm")
    assert sorted(x.name for x in path.iterdir()) == ["drm_config.json", "model.safetensors"]
    loaded = DiffusionRewardModel.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs(4)), before)
    with pytest.raises(FileNotFoundError, match="not a DRM directory"):
        DiffusionRewardModel.from_pretrained(tmp_path)


def test_bradley_terry_by_hand():
    # margins 0, ln 3, -ln 3: -log sigmoid(0) = ln 2; -log(3/4) = ln(4/3); -log(1/4) = ln 4
    loss, stats = bradley_terry_loss(torch.tensor([0.0, math.log(3), 0.0]), torch.tensor([0.0, 0.0, math.log(3)]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3) + math.log(4)) / 3, rel=1e-6)
    assert stats["accuracy"] == pytest.approx(1 / 3)
    buckets = accuracy_by_noise_bucket(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 1.0]),
                                       torch.tensor([0.0, 0.1, 0.9]))
    assert buckets["s0"] == (1.0, 1) and buckets["s0.00-0.25"] == (0.0, 1) and buckets["s0.75-1.00"] == (0.0, 1)


def test_soft_bradley_terry_by_hand():
    # margin ln 3 with p = 0.75: -(0.75 ln(3/4) + 0.25 ln(1/4)); margin 0 with p = 0.9: ln 2 whatever p
    r_w, r_l = torch.tensor([math.log(3), 0.0]), torch.tensor([0.0, 0.0])
    loss, _ = bradley_terry_loss(r_w, r_l, torch.tensor([0.75, 0.9]))
    want = (-(0.75 * math.log(3 / 4) + 0.25 * math.log(1 / 4)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # p = 1 is the plain loss; the soft loss is smallest where sigmoid(margin) = p (margin ln 3 for p = 3/4)
    assert bradley_terry_loss(r_w, r_l, torch.ones(2))[0].item() == pytest.approx(bradley_terry_loss(r_w, r_l)[0].item())
    margins = torch.linspace(0, 3, 301)
    losses = [bradley_terry_loss(m[None], torch.zeros(1), torch.tensor([0.75]))[0].item() for m in margins]
    assert margins[int(torch.tensor(losses).argmin())].item() == pytest.approx(math.log(3), abs=0.01)


def test_noise_levels_follow_the_stated_distribution():
    s = sample_noise_levels(200_000, torch.Generator().manual_seed(0), zero_prob=0.1, shift=3.0)
    assert (s == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    nz = s[s > 0]
    # s = 3u / (1 + 2u) -> u = s / (3 - 2s); P(s <= x) = x / (3 - 2x): P(s <= 0.5) = 0.25, P(s <= 0.75) = 0.5
    assert (nz <= 0.5).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert (nz <= 0.75).float().mean().item() == pytest.approx(0.5, abs=0.005)
    assert nz.max() <= 1.0


# ------------------------------------------------------------------------------------ training at SD3.5 scale

def _pairs(n, seed=0):
    from drm_ray.data.cache import PairBatch

    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                     torch.randn(n, 109, 64, generator=g), torch.randn(n, 64, generator=g), torch.ones(n),
                     [f"p{i}" for i in range(n)])


class _OneRankEngine:
    """DeepSpeed's gradient-accumulation contract on one rank: every backward is divided by the accumulation
    count (scale_wrt_gas), gradients add up until the optimizer step (omitted here: we compare the gradients)."""

    def __init__(self, module, accum):
        self.module, self.accum = module, accum

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        pass


def test_accumulation_and_checkpointing_give_the_full_batch_loss_and_gradients():
    from drm_ray.reward.train_loop import draw_pair_noise, train_step

    def fresh():
        drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, n_drop=2, latent_size=8, seed=1)
        return drm.requires_grad_(True).train()

    batch = _pairs(8)
    s, eps = draw_pair_noise(8, (16, 8, 8), torch.Generator().manual_seed(3), zero_prob=0.25, shift=3.0)
    whole = fresh()
    loss_whole, rw_whole, _ = train_step(_OneRankEngine(whole, 1), batch, s, eps, micro=8, accum=1, world=1,
                                         pairs_per_step=8, device="cpu")
    split = fresh()
    split.gradient_checkpointing = True
    loss_split, rw_split, _ = train_step(_OneRankEngine(split, 4), batch, s, eps, micro=2, accum=4, world=1,
                                         pairs_per_step=8, device="cpu")
    # the step's loss is the mean BT loss over the 8 pairs, whatever the split
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    assert torch.allclose(rw_split, rw_whole, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in whole.named_parameters()}
    checked = 0
    for name, p in split.named_parameters():
        if grads[name] is None:  # e.g. the context branch of the last kept block's output
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-6), name
        checked += 1
    assert checked > 20 and grads["head.out.weight"].abs().sum() > 0


def test_shared_pair_noise_noises_winner_and_loser_alike():
    from drm_ray.reward.model import add_noise
    from drm_ray.reward.train_loop import draw_pair_noise

    s, eps = draw_pair_noise(6, (16, 8, 8), torch.Generator().manual_seed(3), zero_prob=0.0, shift=1.0, shared=True)
    assert eps.shape == (2, 6, 16, 8, 8) and torch.equal(eps[0], eps[1])
    # identical images noised for a pair are then identical latents: only the images' difference is left
    x = torch.randn(6, 16, 8, 8)
    assert torch.equal(add_noise(x, eps[0], s), add_noise(x, eps[1], s))
    s2, ind = draw_pair_noise(6, (16, 8, 8), torch.Generator().manual_seed(3), zero_prob=0.0, shift=1.0)
    assert torch.equal(s, s2) and not torch.equal(ind[0], ind[1])  # the default: one draw each


def test_timestep_reaches_the_time_embedding_in_fp32_with_bf16_weights():
    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8).to(torch.bfloat16)
    seen = []
    drm.time_text_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, _, e, p = _inputs(2)
    sigma = torch.tensor([0.6022, 0.25])
    with torch.no_grad():
        out = drm(x, sigma, e, p)
    assert seen[0].dtype == torch.float32 and out.dtype == torch.float32
    # exactly 1000 * s in fp32 (602.2), not bf16's 604.0
    assert torch.equal(seen[0], 1000.0 * sigma) and seen[0][0].item() != 604.0
    assert drm.time_text_embed.timestep_embedder.linear_1.weight.dtype == torch.bfloat16


def test_training_drm_owns_only_the_kept_blocks_and_drops_the_source():
    import gc
    import weakref

    from diffusers import SD3Transformer2DModel

    from drm_ray.reward.train_loop import build_training_drm

    source = build_tiny(seed=0, text=False, vae=False).transformer
    dropped = {id(p) for b in list(source.transformer_blocks)[1:] for p in b.parameters()}
    dropped |= {id(p) for m in (source.norm_out, source.proj_out) for p in m.parameters()}
    alive = weakref.ref(source)
    drm = build_drm(source, n_drop=3, latent_size=8)
    assert not dropped & {id(p) for p in drm.parameters()}
    del source
    gc.collect()
    assert alive() is None  # the DRM holds no reference to the source transformer

    def transformers_alive():
        gc.collect()
        return sum(isinstance(o, SD3Transformer2DModel) for o in gc.get_objects())

    before = transformers_alive()
    kwargs = dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, resolution=64)
    on_meta = build_training_drm("tiny", kwargs, "meta", n_drop=3, head="mlp", head_dim=4, init="pretrained",
                                 latent_size=8, seed=0, gradient_checkpointing=True)
    assert transformers_alive() == before
    assert all(p.device.type == "meta" for p in on_meta.parameters()) and len(on_meta.blocks) == 1
    assert on_meta.gradient_checkpointing
    assert not any(k.startswith(("norm_out", "proj_out", "transformer_blocks")) for k in on_meta.state_dict())


def test_checkpointing_cuts_the_activations_kept_for_backward():
    from drm_ray.reward.model import backward_saved_bytes

    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, n_drop=1, latent_size=8)
    drm.requires_grad_(True)
    inputs = _inputs(4)
    full = backward_saved_bytes(drm, *inputs)
    drm.gradient_checkpointing = True
    kept = backward_saved_bytes(drm, *inputs)
    # 3 blocks: without checkpointing each keeps ~10 activations of its tokens; with it, its 3 inputs
    assert 0 < kept < full / 4, (kept, full)
    with torch.no_grad():  # and checkpointing changes no number
        drm.gradient_checkpointing = False
        ref = drm.train()(*inputs)
    drm.gradient_checkpointing = True
    assert torch.allclose(drm(*inputs), ref, rtol=1e-6, atol=1e-6)


def test_heldout_noise_is_keyed_per_pair():
    from drm_ray.reward.evaluate import heldout_noise

    all_four = heldout_noise(7, 500, torch.arange(4), (16, 8, 8))  # [2, 4, 16, 8, 8]
    assert all_four.shape == (2, 4, 16, 8, 8)
    assert torch.equal(heldout_noise(7, 500, torch.tensor([3, 1]), (16, 8, 8)), all_four[:, [3, 1]])
    assert not torch.equal(heldout_noise(7, 250, torch.arange(4), (16, 8, 8)), all_four)


def test_validation_over_ranks_scores_what_evaluation_scores(tmp_path):
    """Held-out set with ties: the two ranks' validation shares, counted together, give evaluate_drm's accuracy at
    every t (same pairs, same noise), and each rank holds only its share, with float16 text embeddings."""
    from drm_ray.data.cache import PairBatch, pair_rows, write_meta, write_shard
    from drm_ray.reward.evaluate import evaluate_drm
    from drm_ray.reward.train_loop import load_validation_pairs, validate

    g = torch.Generator().manual_seed(5)
    n = 21
    label = torch.ones(n)
    label[::4] = 0.5  # ties at rows 0, 4, 8, ...: evaluation skips them for accuracy, validation drops them
    batch = PairBatch(torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                      torch.randn(n, 109, 64, generator=g), torch.randn(n, 64, generator=g), label,
                      [f"p{i % 5}" for i in range(n)])
    for i, part in enumerate(torch.arange(n).split(8)):
        write_shard(tmp_path, i, pair_rows(PairBatch(batch.latent_win[part], batch.latent_lose[part],
                                                     batch.prompt_embeds[part], batch.pooled[part],
                                                     batch.label[part], [batch.prompt[j] for j in part.tolist()])))
    write_meta(tmp_path, [16, 8, 8], [109, 64], [64])
    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=1).eval()
    timesteps = (0, 500, 900)
    shares = [load_validation_pairs(tmp_path, 100, rank, 2) for rank in (0, 1)]
    assert sorted(torch.cat([i for _, i in shares]).tolist()) == [r for r in range(n) if r % 4]  # non-ties, once
    assert all(p.prompt_embeds.dtype == torch.float16 and len(p) < 12 for p, _ in shares)
    # each rank's accuracy times its share, summed: the all-reduce of the counts, by hand
    per_rank = [validate(drm, p, i, timesteps, 0, world=2, batch_size=4) for p, i in shares]
    evaluated = evaluate_drm(drm, tmp_path, timesteps=timesteps, batch_size=5)
    for t, row in zip(timesteps, evaluated):
        correct = sum(v[f"val/accuracy_t{t}"] * len(p) for v, (p, _) in zip(per_rank, shares))
        assert row.pairs == 15 and round(correct) == round(row.accuracy * row.pairs)  # pair counts, exactly
    first5, _ = load_validation_pairs(tmp_path, 5)
    assert len(first5) == 5 and first5.prompt == [batch.prompt[r] for r in (1, 2, 3, 5, 6)]
