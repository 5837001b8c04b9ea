"""Pre-training of the toy preset's transformer: rectified-flow matching on the procedural dataset, one CPU process.

    x_t = (1 - s) x_0 + s eps,   target v = eps - x_0,   s = sigmoid(n), n ~ N(0, 1)     (SD3's logit-normal)

with x_0 the PCA-codec latent of a scene and 10% of captions dropped to "" so classifier-free guidance works.
AdamW with a linear warm-up and cosine decay; an exponential moving average of the weights is what gets saved.
The dataset is drawn once (scene i of `data_seed`), the codec fitted on a separate draw; text embeddings of the 90
captions and of "" are computed once (the text encoders are frozen and random-init, so only the transformer learns).
With `extra_object_rate` > 0 that fraction of the training images also shows an object its caption does not mention
(drm_ray.toy.world.scene): the model learns to add one now and then, a flaw an aligned model should lose.

At the end the EMA model samples every caption with a few seeds (ODE, CFG) and the oracle grades them; the numbers
go into `toy_meta.json` beside the weights, so a user sees how well the checkpoint follows captions before using it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.diffusion.sampling import decode_latents, denoise, encode_images, initial_latents
from drm_ray.models.sd3 import encode_prompts
from drm_ray.toy.codec import fit_codec
from drm_ray.toy.model import VAE_SCALE, build_toy, toy_transformer
from drm_ray.toy.oracle import has_extra_object, oracle_scores
from drm_ray.toy.world import RESOLUTION, caption_texts, scene_batch


def encode_dataset(codec, images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Images [N, H, W, 3] in [0, 1] -> codec latents [N, 16, H/4, W/4]."""
    out = [encode_images(codec, torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2))
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def caption_table(comps, max_sequence_length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(captions, embeds [91, L, D], pooled [91, P]); the last row is the empty caption (CFG's unconditional)."""
    texts = caption_texts() + [""]
    embeds, pooled = encode_prompts(comps, texts, max_sequence_length)
    return texts, embeds, pooled


def flow_matching_loss(transformer, x0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    s = torch.sigmoid(torch.randn(len(x0), generator=generator))          # [B] logit-normal noise levels
    eps = torch.randn(x0.shape, generator=generator)                      # [B, C, h, w]
    xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
    v = transformer(hidden_states=xt, timestep=1000 * s, encoder_hidden_states=embeds, pooled_projections=pooled,
                    return_dict=False)[0]
    return torch.nn.functional.mse_loss(v.float(), eps - x0)


@torch.no_grad()
def evaluate_samples(comps, embeds: torch.Tensor, pooled: torch.Tensor, texts: list[str], seeds_per_caption: int,
                     num_steps: int, guidance_scale: float, seed: int = 1234) -> tuple[dict, torch.Tensor]:
    """ODE samples of every caption x `seeds_per_caption`, graded by the oracle; and the first seed's images."""
    n = len(texts) - 1
    sigmas = schedule_sigmas(comps.scheduler, num_steps)
    scores, correct, extra, first = [], [], [], None
    for rep in range(seeds_per_caption):
        gen = torch.Generator().manual_seed(seed + rep)
        x1 = initial_latents(n, comps.transformer.config.in_channels, RESOLUTION // VAE_SCALE, gen)
        lat = denoise(comps.transformer, sigmas, embeds[:n], pooled[:n], embeds[n:].expand(n, -1, -1),
                      pooled[n:].expand(n, -1), guidance_scale, 0.0, x1)
        images = decode_latents(comps.vae, lat)
        first = images if first is None else first
        res = oracle_scores(images, texts[:n])
        scores.append(res.score)
        correct.append(res.correct)
        extra.append(has_extra_object(images, texts[:n]))
    scores, correct, extra = np.concatenate(scores), np.concatenate(correct), np.concatenate(extra)
    return {"oracle_mean": float(scores.mean()), "oracle_std": float(scores.std()),
            "correct_fraction": float(correct.mean()), "extra_object_fraction": float(extra.mean()),
            "samples": int(len(scores)),
            "num_steps": num_steps, "guidance_scale": guidance_scale}, first


def train_flow_matching(transformer, latents: torch.Tensor, caption_ids: torch.Tensor, embeds: torch.Tensor,
                        pooled: torch.Tensor, empty: int, *, steps: int, batch_size: int, lr: float, warmup: int,
                        ema_decay: float, cfg_dropout: float, seed: int, log=None,
                        log_every: int = 100) -> tuple[torch.nn.Module, list[float], float]:
    """Train `transformer` in place on latents [N, C, h, w] with caption rows `caption_ids` [N] of (embeds, pooled)
    (`empty` = the "" row); returns (the EMA copy, per-step losses, seconds)."""
    transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))))
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        ids = torch.where(torch.rand(batch_size, generator=gen) < cfg_dropout, empty, caption_ids[idx])
        loss = flow_matching_loss(transformer, latents[idx], embeds[ids], pooled[ids], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early weights must not linger in a short run
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            log({"train/loss": float(np.mean(losses[-log_every:])), "train/lr": sched.get_last_lr()[0],
                 "train/steps_per_s": (step + 1) / (time.perf_counter() - start)}, step + 1)
    transformer.eval().requires_grad_(False)
    return ema, losses, time.perf_counter() - start


def pretrain_toy(out_dir: str | Path, *, seed: int = 0, data_seed: int = 1, dataset_size: int = 20_000,
                 num_layers: int = 6, num_attention_heads: int = 4, attention_head_dim: int = 24,
                 max_sequence_length: int = 16, steps: int = 2500, batch_size: int = 64, lr: float = 1e-3,
                 warmup: int = 200, ema_decay: float = 0.999, cfg_dropout: float = 0.1, eval_steps: int = 8,
                 eval_guidance: float = 4.5, eval_seeds: int = 2, codec_images: int = 4096,
                 extra_object_rate: float = 0.0,
                 log: Callable[[dict, int], None] | None = None, log_every: int = 100) -> dict:
    """Pre-train and write `out_dir/{transformer,vae}` + `toy_meta.json`; returns the metadata."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    codec, kept = fit_codec(scene_batch(data_seed + 1_000, 0, codec_images, extra_object_rate)[1])
    captions, images = scene_batch(data_seed, 0, dataset_size, extra_object_rate)
    latents = encode_dataset(codec, images)                                       # [N, 16, 8, 8]
    recon = decode_latents(codec, latents[:512]).permute(0, 2, 3, 1).numpy()
    recon_rmse = float(np.sqrt(((recon - images[:512]) ** 2).mean()))
    data_seconds = time.perf_counter() - start

    transformer = toy_transformer(seed, num_layers, num_attention_heads, attention_head_dim, RESOLUTION)
    comps = build_toy(None, seed=seed, max_sequence_length=max_sequence_length, transformer=transformer, vae=False)
    comps.vae = codec
    texts, embeds, pooled = caption_table(comps, max_sequence_length)
    index = {t: i for i, t in enumerate(texts)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = len(texts) - 1

    ema, losses, train_seconds = train_flow_matching(
        transformer, latents, caption_ids, embeds, pooled, empty, steps=steps, batch_size=batch_size, lr=lr,
        warmup=warmup, ema_decay=ema_decay, cfg_dropout=cfg_dropout, seed=seed, log=log, log_every=log_every)

    raw_quality, _ = evaluate_samples(comps, embeds, pooled, texts, 1, eval_steps, eval_guidance)
    comps.transformer = ema
    quality, images_seed0 = evaluate_samples(comps, embeds, pooled, texts, eval_seeds, eval_steps, eval_guidance)
    data_quality = oracle_scores(images[:512], captions[:512])
    data_extra = has_extra_object(images[:512], captions[:512])
    meta = {
        "architecture": {"num_layers": num_layers, "num_attention_heads": num_attention_heads,
                         "attention_head_dim": attention_head_dim, "max_sequence_length": max_sequence_length,
                         "resolution": RESOLUTION, "params": sum(p.numel() for p in ema.parameters())},
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed,
                     "data_seed": data_seed, "dataset_size": dataset_size, "cfg_dropout": cfg_dropout,
                     "extra_object_rate": extra_object_rate,
                     "final_loss": float(np.mean(losses[-100:])), "train_seconds": train_seconds,
                     "data_seconds": data_seconds, "total_seconds": time.perf_counter() - start},
        "codec": {"variance_kept": kept, "reconstruction_rmse": recon_rmse},
        "samples": quality,
        "samples_without_ema": raw_quality,
        "dataset": {"oracle_mean": float(data_quality.score.mean()),
                    "correct_fraction": float(data_quality.correct.mean()),
                    "extra_object_fraction": float(data_extra.mean())},
    }
    save_checkpoint(out_dir, ema, codec, meta, sample_grid(images_seed0))
    return meta


def sample_grid(images: torch.Tensor, columns: int = 15, scale: int = 2):
    """One sample per caption, in caption order (rows of 15: the 5 positions of each colour x shape, then counts)."""
    from drm_ray.diffusion.sampling import to_pil
    from drm_ray.rl_setup import image_grid

    grid = image_grid(to_pil(images), columns)
    return grid.resize((grid.width * scale, grid.height * scale), resample=0)


def save_checkpoint(out_dir: Path, transformer, codec, meta: dict, grid=None) -> None:
    """transformer/ and vae/ in diffusers layout, toy_meta.json and samples.png, assembled beside and renamed."""
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp / "transformer")
    codec.save_pretrained(tmp / "vae")
    (tmp / "toy_meta.json").write_text(json.dumps(meta, indent=2))
    if grid is not None:
        grid.save(tmp / "samples.png")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
