import math

import pytest
import torch

from drm_ray.algorithms.losses import accuracy_by_noise_bucket, bradley_terry_loss
from drm_ray.diffusion.flow import sample_noise_levels
from drm_ray.reward.model import DiffusionRewardModel, build_drm
from drm_ray.models.sd3 import build_tiny


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


def test_noise_levels_follow_the_stated_distribution():
    s = sample_noise_levels(200_000, torch.Generator().manual_seed(0), zero_prob=0.1, shift=3.0)
    assert (s == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    nz = s[s > 0]
    # s = 3u / (1 + 2u) -> u = s / (3 - 2s); P(s <= x) = x / (3 - 2x): P(s <= 0.5) = 0.25, P(s <= 0.75) = 0.5
    assert (nz <= 0.5).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert (nz <= 0.75).float().mean().item() == pytest.approx(0.5, abs=0.005)
    assert nz.max() <= 1.0
