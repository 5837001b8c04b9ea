"""SD3 components for a preset: the transformer, VAE, three text encoders with tokenizers, and the scheduler.

- `tiny`: random-init, seeded modules with the SD3 architecture, small enough for CPU tests (a 4-block DiT of width
  32, a 4-level VAE with 16 latent channels, two 2-layer CLIPs and a 2-layer T5). Tokenizers are built in code: a
  byte-level CLIP vocabulary (256 byte symbols, their `</w>` variants, start/end; no merges) and a character-level
  T5 unigram vocabulary. Nothing is downloaded.
- `toy`: the toy world's pre-trained transformer, PCA patch codec and word-level text stack (drm_ray/toy/model.py;
  a checkpoint written by jobs/pretrain_toy.py, loaded from model.path).
- `sd35m`: Stable Diffusion 3.5-Medium through diffusers' / transformers' `from_pretrained` from a local directory
  or a hub id (standard subfolders).

Prompt encoding goes through diffusers' own `StableDiffusion3Pipeline.encode_prompt`, so every preset produces SD3's
`(prompt_embeds [B, CLIP tokens (77; toy 16) + T5 tokens, D], pooled [B, 2 * clip_proj])` as the stock pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MAX_LENGTH = 77
VAE_SCALE = 8  # pixels per latent cell for every SD3 VAE (the toy preset's codec: 4; see vae_scale)


@dataclass
class SD3Components:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL | None             # or the toy preset's PatchPCACodec
    text_encoder: CLIPTextModelWithProjection | None
    text_encoder_2: CLIPTextModelWithProjection | None
    text_encoder_3: T5EncoderModel | None
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None
    tokenizer_3: T5Tokenizer | None
    scheduler: FlowMatchEulerDiscreteScheduler

    def pipeline(self) -> StableDiffusion3Pipeline:
        """A stock diffusers pipeline over these modules (shares the weights, copies nothing)."""
        vae = self.vae if isinstance(self.vae, AutoencoderKL) else None  # the toy codec is not a diffusers VAE
        return StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=self.scheduler, vae=vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def default_device() -> torch.device:
    """The torch device, chosen from torch (never from Ray's GPU ids, which may be fake)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- tiny


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map, in byte order of the printable run first."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def byte_clip_vocab() -> dict[str, int]:
    """start, end, the 256 byte symbols and their end-of-word variants: 514 tokens."""
    symbols = _byte_symbols()
    return {"<|startoftext|>": 0, "<|endoftext|>": 1, **{s: i + 2 for i, s in enumerate(symbols)},
            **{s + "</w>": i + 258 for i, s in enumerate(symbols)}}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=byte_clip_vocab(), merges=[], model_max_length=CLIP_MAX_LENGTH)  # 514 tokens


def tiny_t5_tokenizer(max_length: int) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(33, 127)] + [("\u2581", -2.0)]  # printable ASCII + the word marker
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)  # 98 tokens


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_text_encoders(seed: int, clip_vocab: int = 514, t5_vocab: int = 98,
                       clip_length: int = CLIP_MAX_LENGTH) -> dict:
    """Seeded random-init CLIP-with-projection x2 (hidden 32, projection 32) and T5 (d_model 64), 2 layers each."""
    def clip_config():
        return CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=32, max_position_embeddings=clip_length,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return dict(
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModelWithProjection(clip_config())),
        text_encoder_2=_seeded(seed + 3, lambda: CLIPTextModelWithProjection(clip_config())),
        text_encoder_3=_seeded(seed + 4, lambda: T5EncoderModel(T5Config(
            vocab_size=t5_vocab, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))),
    )


def build_tiny(seed: int = 0, num_layers: int = 4, num_attention_heads: int = 2, attention_head_dim: int = 16,
               resolution: int = 64, max_sequence_length: int = 32, text: bool = True, vae: bool = True,
               shift: float = 3.0) -> SD3Components:
    """Seeded random-init SD3 components; the same arguments give bit-identical weights in every process."""
    clip_proj, t5_dim = 32, 64
    width = num_attention_heads * attention_head_dim
    latent = resolution // VAE_SCALE
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_dim, caption_projection_dim=width, pooled_projection_dim=2 * clip_proj,
        pos_embed_max_size=max(32, latent // 2 * 2),
    ))
    parts: dict = dict(vae=None, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                       tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    if vae:
        parts["vae"] = _seeded(seed + 1, lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=resolution, scaling_factor=1.5305,
            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        ))
    if text:
        parts.update(tiny_text_encoders(seed))
        parts["tokenizer"] = tiny_clip_tokenizer()
        parts["tokenizer_2"] = tiny_clip_tokenizer()
        parts["tokenizer_3"] = tiny_t5_tokenizer(max_sequence_length)
    for module in (transformer, *parts.values()):
        if isinstance(module, torch.nn.Module):
            module.eval()
    return SD3Components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **parts)


# ---------------------------------------------------------------------------------------------- sd35m


def load_pretrained(path: str, dtype: torch.dtype = torch.bfloat16, text: bool = True,
                    vae: bool = True) -> SD3Components:
    """SD3.5-Medium (or any SD3-family diffusers directory / hub id) in its standard subfolder layout."""
    def load(cls, sub, **kw):
        return cls.from_pretrained(path, subfolder=sub, **kw)
    parts: dict = dict(vae=None, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                       tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    transformer = load(SD3Transformer2DModel, "transformer", torch_dtype=dtype)
    if vae:
        # The VAE stays float32: SD3's VAE overflows in fp16 and latents are cached in fp32 anyway.
        parts["vae"] = load(AutoencoderKL, "vae", torch_dtype=torch.float32)
    if text:
        parts["text_encoder"] = load(CLIPTextModelWithProjection, "text_encoder", torch_dtype=dtype)
        parts["text_encoder_2"] = load(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype)
        parts["text_encoder_3"] = load(T5EncoderModel, "text_encoder_3", torch_dtype=dtype)
        parts["tokenizer"] = load(CLIPTokenizer, "tokenizer")
        parts["tokenizer_2"] = load(CLIPTokenizer, "tokenizer_2")
        parts["tokenizer_3"] = load(T5Tokenizer, "tokenizer_3")
    for module in (transformer, *parts.values()):
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    return SD3Components(transformer=transformer, scheduler=scheduler, **parts)


def load_vae(preset: str, path: str | None, resolution: int = 64, seed: int = 0) -> AutoencoderKL:
    """The preset's VAE alone, float32 on CPU (the driver decodes image panels with it; no transformer is built)."""
    if preset == "tiny":
        return build_tiny(seed=seed, resolution=resolution, text=False).vae
    if preset == "toy":
        from drm_ray.toy.model import load_codec
        return load_codec(path)
    return AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).eval()


def build_components(preset: str, *, path: str | None = None, dtype: str = "float32", seed: int = 0,
                     num_layers: int = 4, num_attention_heads: int = 2, attention_head_dim: int = 16,
                     resolution: int = 64, max_sequence_length: int = 32, shift: float = 3.0,
                     text: bool = True, vae: bool = True, device: torch.device | str | None = None) -> SD3Components:
    """The components of a preset on `device`; `text=False` / `vae=False` skip modules a role does not need."""
    if preset == "tiny":
        comps = build_tiny(seed=seed, num_layers=num_layers, num_attention_heads=num_attention_heads,
                           attention_head_dim=attention_head_dim, resolution=resolution,
                           max_sequence_length=max_sequence_length, text=text, vae=vae, shift=shift)
        if dtype != "float32":
            comps.transformer.to(torch_dtype(dtype))
    elif preset == "toy":
        from drm_ray.toy.model import build_toy
        comps = build_toy(path, seed=seed, max_sequence_length=max_sequence_length, shift=shift, text=text, vae=vae)
        if dtype != "float32":
            comps.transformer.to(torch_dtype(dtype))
    elif preset == "sd35m":
        if not path:
            raise ValueError("model.path is required for the sd35m preset")
        comps = load_pretrained(path, dtype=torch_dtype(dtype), text=text, vae=vae)
    else:
        raise ValueError(f"unknown model preset {preset!r} (expected tiny, toy or sd35m)")
    device = torch.device(device) if device is not None else default_device()
    for module in (comps.transformer, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3):
        if module is not None:
            module.to(device)
    return comps


def vae_scale(preset: str) -> int:
    """Pixels per latent cell: 8 for SD3 VAEs, 4 for the toy preset's patch codec."""
    if preset == "toy":
        from drm_ray.toy.model import VAE_SCALE as TOY_SCALE
        return TOY_SCALE
    return VAE_SCALE


def latent_size(preset: str, resolution: int) -> int:
    return resolution // vae_scale(preset)


def model_kwargs(model_cfg, sampling_cfg) -> dict:
    """`build_components` arguments from the config sections (the one place that reads them).

    A relative local model.path becomes absolute here, on the driver, so actors started elsewhere find it."""
    path = model_cfg.path
    if path and model_cfg.preset == "toy":
        path = str(Path(path).resolve())
    return dict(path=path, dtype=model_cfg.dtype, seed=model_cfg.seed, num_layers=model_cfg.num_layers,
                num_attention_heads=model_cfg.num_attention_heads, attention_head_dim=model_cfg.attention_head_dim,
                resolution=sampling_cfg.resolution, max_sequence_length=model_cfg.max_sequence_length,
                shift=sampling_cfg.shift)


@torch.no_grad()
def encode_prompts(comps: SD3Components, prompts: list[str], max_sequence_length: int,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text conditioning through diffusers' own encoder path: (prompt_embeds [B, L, D], pooled [B, P])."""
    if comps.text_encoder is None:
        raise ValueError("these components were built without text encoders (text=False)")
    device = device or comps.text_encoder.device
    embeds, _, pooled, _ = comps.pipeline().encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
    )
    return embeds, pooled
