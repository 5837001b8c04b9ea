"""DRM, the Diffusion-based Reward Model: an SD3 transformer without its last blocks, plus a reward head.

    f_v = blocks[:-n_drop](patchify(x_s), context_embedder(c), time_text_embed(1000 s, pooled))  # image tokens
    r   = head(f_v)                                                                            # one scalar

The full pre-trained transformer is loaded first and then `transformer_blocks[:-n_drop]` kept (SD3's last block is
built differently, `context_pre_only`, so building a shorter model and loading weights into it would be wrong).
`init="random"` re-initializes the same architecture (the paper's ablation: no generative prior).

Heads: `mlp` maps each image token to `head_dim` features, flattens and projects to a scalar (fixed resolution, the
paper's head); `mean` maps tokens to features, mean-pools and projects (any resolution).

Training at SD3.5 scale: `gradient_checkpointing = True` recomputes each kept block in the backward pass
(`torch.utils.checkpoint` around the block call: forward calls the blocks itself, so diffusers' own switch does not
apply). The timestep reaches `time_text_embed` in float32, as in diffusers' pipeline: in bf16, 1000 * 0.6022 would
become 604.0.

A trained DRM is one directory: `drm_config.json` (the source transformer's config, n_drop, head) and
`model.safetensors`. Loading builds the architecture on the meta device, so SD3.5-scale models cost no random init.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from drm_ray.diffusion.flow import add_noise

CONFIG_NAME = "drm_config.json"
WEIGHTS_NAME = "model.safetensors"


class RewardHead(nn.Module):
    def __init__(self, width: int, kind: str = "mlp", head_dim: int = 4, num_tokens: int | None = None):
        super().__init__()
        if kind == "mlp" and not num_tokens:
            raise ValueError("the mlp reward head needs num_tokens (it is tied to one resolution)")
        self.kind = kind
        self.token_mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                       nn.Linear(width, head_dim))
        self.out = nn.Linear(head_dim * (num_tokens if kind == "mlp" else 1), 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        feats = self.token_mlp(tokens)  # [B, N, head_dim]
        pooled = feats.flatten(1) if self.kind == "mlp" else feats.mean(dim=1)
        return self.out(pooled).squeeze(-1)  # [B]


class DiffusionRewardModel(nn.Module):
    """R(x_s, s, c): scores a (noisy) SD3 latent at noise level s for a prompt."""

    def __init__(self, transformer: SD3Transformer2DModel, n_drop: int = 3, head: str = "mlp", head_dim: int = 4,
                 latent_size: int | None = None):
        super().__init__()
        cfg = transformer.config
        if not 0 <= n_drop < cfg.num_layers:
            raise ValueError(f"n_drop={n_drop} must be in [0, {cfg.num_layers - 1}] for a {cfg.num_layers}-block "
                             "transformer")
        latent_size = latent_size or cfg.sample_size
        self.transformer_config = dict(cfg)
        self.n_drop, self.head_kind, self.head_dim, self.latent_size = n_drop, head, head_dim, latent_size
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.blocks = nn.ModuleList(list(transformer.transformer_blocks)[: cfg.num_layers - n_drop])
        width = cfg.num_attention_heads * cfg.attention_head_dim
        num_tokens = (latent_size // cfg.patch_size) ** 2
        self.head = RewardHead(width, head, head_dim, num_tokens).to(
            device=transformer.pos_embed.proj.weight.device, dtype=transformer.dtype)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed.proj.weight.device

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w], sigma [B] in [0, 1], prompt_embeds [B, L, D], pooled [B, P] -> rewards [B] fp32."""
        dtype = self.dtype
        hidden = self.pos_embed(latents.to(dtype)).contiguous()  # [B, N, W]
        # fp32 timestep: time_proj computes its sinusoids in fp32 and casts to the pooled dtype afterwards
        temb = self.time_text_embed(1000.0 * sigma.float(), pooled.to(dtype))  # [B, W]
        context = self.context_embedder(prompt_embeds.to(dtype))  # [B, L, W]
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keep only the block's inputs; rebuild its activations in the backward pass
                context, hidden = checkpoint(block, hidden, context, temb, use_reentrant=False)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        return self.head(hidden).float()

    # ------------------------------------------------------------------------------------------ persistence

    def drm_config(self) -> dict:
        return dict(transformer_config=self.transformer_config, n_drop=self.n_drop, head=self.head_kind,
                    head_dim=self.head_dim, latent_size=self.latent_size)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the DRM directory atomically (a temporary sibling, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.drm_config(), indent=2, default=_json_default))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> "DiffusionRewardModel":
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a DRM directory (expected {CONFIG_NAME} and {WEIGHTS_NAME}; "
                                    "write one with jobs/train_drm.py)")
        cfg = json.loads((path / CONFIG_NAME).read_text())
        with torch.device("meta"):
            transformer = SD3Transformer2DModel.from_config(cfg["transformer_config"])
            model = cls(transformer, n_drop=cfg["n_drop"], head=cfg["head"], head_dim=cfg["head_dim"],
                        latent_size=cfg["latent_size"])
        state = load_file(path / WEIGHTS_NAME)
        missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the DRM config (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
        # Materialize on the target device, then copy: fresh allocations (not views of the file buffer) keep the
        # numerics bit-identical to the model that was saved.
        dtype = dtype or state[next(iter(state))].dtype
        model = model.to_empty(device=device).to(dtype)
        model.load_state_dict(state)
        return model.eval()

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None:
        """Raise if this DRM cannot score the latents / prompt embeddings of a policy with this config."""
        mine = self.transformer_config
        for key in ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim"):
            if mine.get(key) != transformer_config.get(key):
                raise ValueError(f"the DRM does not match the policy: {key} is {mine.get(key)} in the DRM and "
                                 f"{transformer_config.get(key)} in the policy transformer")
        if self.head_kind == "mlp" and latent_size != self.latent_size:
            raise ValueError(f"the DRM's mlp head was trained for {self.latent_size}x{self.latent_size} latents, "
                             f"the policy samples {latent_size}x{latent_size} (train with drm.head=mean for any size)")


def score_noised_pairs(drm, batch, s: torch.Tensor, eps: torch.Tensor):
    """Rewards of winner and loser, each noised at its pair's s: batch (a PairBatch on the model's device),
    s [B], eps [2, B, C, h, w] -> r_w [B], r_l [B]. `drm` is the DRM or a wrapper that runs its forward."""
    device = batch.latent_win.device
    s = s.to(device)
    x_w = add_noise(batch.latent_win, eps[0].to(device), s)  # [B, C, h, w]
    x_l = add_noise(batch.latent_lose, eps[1].to(device), s)
    rewards = drm(torch.cat([x_w, x_l]), torch.cat([s, s]), batch.prompt_embeds.repeat(2, 1, 1),
                  batch.pooled.repeat(2, 1))  # [2B]
    r_w, r_l = rewards.chunk(2)
    return r_w, r_l


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def build_drm(transformer: SD3Transformer2DModel, n_drop: int = 3, head: str = "mlp", head_dim: int = 4,
              init: str = "pretrained", latent_size: int | None = None, seed: int = 0) -> DiffusionRewardModel:
    """A DRM from a full (pre-trained) transformer; `init="random"` re-initializes the same architecture.

    The source transformer's modules are reused, not copied: pass a transformer you will not use elsewhere.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init == "random":
            fresh = SD3Transformer2DModel.from_config(transformer.config)
            transformer = fresh.to(device=transformer.device, dtype=transformer.dtype)
        elif init != "pretrained":
            raise ValueError(f"init={init!r}: expected pretrained or random")
        return DiffusionRewardModel(transformer, n_drop=n_drop, head=head, head_dim=head_dim,
                                    latent_size=latent_size)


def backward_saved_bytes(drm: DiffusionRewardModel, latents: torch.Tensor, sigma: torch.Tensor,
                         prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training forward of `drm` (its current
    `gradient_checkpointing` setting), parameters excluded; divide by the batch size for bytes per sequence.

    Counts every tensor saved for backward once per storage, plus, with checkpointing, the inputs each checkpointed
    block keeps for its recomputation (torch.utils.checkpoint holds them outside the saved-tensor hooks).
    """
    params = {p.untyped_storage().data_ptr() for p in drm.parameters()}
    storages: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
        return t

    def block_inputs(module, args, kwargs):
        for t in (*args, *kwargs.values()):
            keep(t)

    was_training = drm.training
    drm.train()
    hooks = [b.register_forward_pre_hook(block_inputs, with_kwargs=True) for b in drm.blocks] \
        if drm.gradient_checkpointing else []
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = drm(latents, sigma, prompt_embeds, pooled)
        del out
    finally:
        for h in hooks:
            h.remove()
        drm.train(was_training)
    return sum(storages.values())
