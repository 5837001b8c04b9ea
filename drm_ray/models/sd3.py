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

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from drm_ray.models.components import (  # noqa: F401  (torch_dtype, default_device: used by callers of this module)
    DTYPES, SD3Components, default_device, empty_parts, seeded, torch_dtype,
)
from drm_ray.models.tiny_text import tiny_text_stack

VAE_SCALE = 8  # pixels per latent cell for every SD3 VAE (the toy preset's codec: 4; see vae_scale)


# ---------------------------------------------------------------------------------------------- tiny


def tiny_vae(seed: int = 0, resolution: int = 64) -> AutoencoderKL:
    """Seeded random-init SD3-style VAE (16 latent channels, factor 8, SD3's scaling and shift factors)."""
    return seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=resolution, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )).eval()


def build_tiny(seed: int = 0, num_layers: int = 4, num_attention_heads: int = 2, attention_head_dim: int = 16,
               resolution: int = 64, max_sequence_length: int = 32, text: bool = True, vae: bool = True,
               shift: float = 3.0) -> SD3Components:
    """Seeded random-init SD3 components; the same arguments give bit-identical weights in every process."""
    clip_proj, t5_dim = 32, 64
    width = num_attention_heads * attention_head_dim
    latent = resolution // VAE_SCALE
    transformer = seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_dim, caption_projection_dim=width, pooled_projection_dim=2 * clip_proj,
        pos_embed_max_size=max(32, latent // 2 * 2),
    ))
    parts = empty_parts()
    if vae:
        parts["vae"] = tiny_vae(seed, resolution)
    if text:
        parts.update(tiny_text_stack(seed, max_sequence_length))
    for module in (transformer, *parts.values()):
        if isinstance(module, torch.nn.Module):
            module.eval()
    return SD3Components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **parts)


# ---------------------------------------------------------------------------------------------- sd35m


class ModelSourceError(FileNotFoundError):
    """model.path names no usable weights (missing directory, missing subfolder, unknown or gated hub id)."""


SD3_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                  "tokenizer_2", "tokenizer_3", "scheduler")


def check_model_source(path: str | None, subfolders: tuple[str, ...] = SD3_SUBFOLDERS) -> str:
    """Check on the driver, before any Ray work, that `path` (model.path) can provide `subfolders`; returns "local"
    or "hub". Raises ModelSourceError with one short message naming model.path (and HF_TOKEN where a token could
    help): actors would otherwise fail one by one, each retry burying the reason in a traceback."""
    if not path:
        raise ModelSourceError("model.path is empty: set it to a local diffusers directory of SD3.5-Medium or a hub "
                               "id such as stabilityai/stable-diffusion-3.5-medium")
    local = Path(path).expanduser()
    if local.is_dir():
        missing = [sub for sub in subfolders if not (local / sub).is_dir()]
        if missing:
            lacks = ", ".join(f"{sub}/" for sub in missing)
            raise ModelSourceError(f"model.path {path} is a directory but lacks {lacks} (expected the diffusers "
                                   f"layout of StableDiffusion3Pipeline.save_pretrained)")
        return "local"
    if path.startswith(("/", "./", "../", "~")) or path.count("/") != 1:
        raise ModelSourceError(f"model.path {path} does not exist (neither a local directory nor a hub id "
                               f"of the form owner/name)")
    import huggingface_hub
    from huggingface_hub import errors

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        if huggingface_hub.try_to_load_from_cache(path, "model_index.json") is None:
            raise ModelSourceError(f"model.path {path} is a hub id, HF_HUB_OFFLINE is set and the local Hugging Face "
                                   f"cache has no copy: download it first (huggingface-cli download {path}, with "
                                   f"HF_TOKEN for a gated model) or set model.path to a local directory")
        return "hub"
    try:
        huggingface_hub.auth_check(path)
    except errors.GatedRepoError:
        token = "HF_TOKEN is not set" if not huggingface_hub.get_token() else "the token in HF_TOKEN has no access"
        raise ModelSourceError(f"model.path {path} is a gated model and {token}: accept its license on "
                               f"https://huggingface.co/{path} and set HF_TOKEN on every node (or download it once "
                               f"to shared storage and set model.path to that directory)") from None
    except errors.RepositoryNotFoundError:
        raise ModelSourceError(f"model.path {path} was not found on the hub (a typo, or a private repository: set "
                               f"HF_TOKEN)") from None
    except errors.HfHubHTTPError as err:
        raise ModelSourceError(f"could not check model.path {path} on the hub ({type(err).__name__}: "
                               f"{str(err).splitlines()[0]}); set model.path to a local directory") from None
    except OSError as err:  # no network, DNS, proxy
        raise ModelSourceError(f"could not reach the hub to check model.path {path} ({type(err).__name__}); set "
                               f"model.path to a local directory, or HF_HUB_OFFLINE=1 with a cached copy") from None
    return "hub"


def load_pretrained(path: str, dtype: torch.dtype = torch.bfloat16, text: bool = True,
                    vae: bool = True) -> SD3Components:
    """SD3.5-Medium (or any SD3-family diffusers directory / hub id) in its standard subfolder layout."""
    def load(cls, sub, **kw):
        return cls.from_pretrained(path, subfolder=sub, **kw)
    parts = empty_parts()
    transformer = load(SD3Transformer2DModel, "transformer", torch_dtype=dtype)
    if vae:
        # The VAE stays float32: SD3's VAE overflows in fp16 (the cache stores latents in data.latent_dtype).
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
        return tiny_vae(seed, resolution)
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
