import torch

from drm_ray.models.sd3 import build_components, build_tiny, encode_prompts
from drm_ray.models.tiny_text import tiny_clip_tokenizer, tiny_t5_tokenizer


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny(seed=7, text=False, vae=False)
    after = torch.rand(1)
    b = build_tiny(seed=7, text=False, vae=False)
    c = build_tiny(seed=8, text=False, vae=False)
    assert torch.equal(before, after)  # building does not consume the caller's RNG
    for (n, pa), pb in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.transformer.pos_embed.proj.weight, c.transformer.pos_embed.proj.weight)


def test_tiny_architecture_rules(tiny):
    t = tiny.transformer.config
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert t.pooled_projection_dim == (tiny.text_encoder.config.projection_dim
                                       + tiny.text_encoder_2.config.projection_dim)
    assert t.joint_attention_dim == tiny.text_encoder_3.config.d_model
    assert t.num_layers >= 4 and tiny.vae.config.latent_channels == t.in_channels == 16
    # the last SD3 block is built differently (context_pre_only): the DRM must slice, not rebuild
    assert tiny.transformer.transformer_blocks[-1].context_pre_only


def test_tokenizers_built_in_code_round_trip(tmp_path):
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer(32)
    ids = clip("a red circle").input_ids
    assert ids[0] == 0 and ids[-1] == 1 and len(clip) == 514
    clip.save_pretrained(tmp_path / "clip")
    assert type(clip).from_pretrained(tmp_path / "clip")("a red circle").input_ids == ids
    t5_ids = t5("a red circle").input_ids
    assert t5_ids[-1] == t5.eos_token_id and len(t5) == 98
    assert t5.convert_ids_to_tokens(t5_ids)[:3] == ["\u2581", "a", "\u2581"]


def test_encode_prompts_shapes_and_prompt_dependence(tiny):
    embeds, pooled = encode_prompts(tiny, ["a red circle", "a blue square"], max_sequence_length=32)
    assert embeds.shape == (2, 77 + 32, 64) and pooled.shape == (2, 64)
    assert not torch.allclose(embeds[0], embeds[1])
    again, _ = encode_prompts(tiny, ["a red circle"], max_sequence_length=32)
    torch.testing.assert_close(again[0], embeds[0])


def test_build_components_skips_roles_modules():
    comps = build_components("tiny", text=False, vae=False, device="cpu")
    assert comps.text_encoder is None and comps.vae is None and comps.tokenizer_3 is None
    assert comps.scheduler.config.shift == 3.0
