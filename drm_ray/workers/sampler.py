"""StepwiseSampler: holds the SD3 components and samples batches of (prompt, seed) with Step-wise Sampling.

A plain class: `jobs/sample.py` uses it in-process, or the driver makes it a Ray actor next to `DRMScorer` actors
(`drm_ray.sample_driver`). Each item gets its own `torch.Generator(seed)` for the initial noise and every SDE draw,
so an image depends on its prompt and seed only, not on the batch or the worker that sampled it.

The scorer is a `DRMScorer` in the same process or a `RemoteScorer` around a `DRMScorer` actor. When one is given,
the final latents are scored too (at s = 0), which is what "the DRM score of the selected samples" means in the
outputs. With k = 1 the steps never call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.diffusion.sampling import decode_latents, initial_latents
from drm_ray.diffusion.stepwise import stepwise_sample
from drm_ray.models.sd3 import build_components, encode_prompts, latent_size


class Scorer(Protocol):
    def score(self, latents: torch.Tensor, noise_levels: torch.Tensor, prompt_embeds: torch.Tensor,
              pooled: torch.Tensor) -> torch.Tensor: ...

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None: ...


@dataclass
class SampleBatch:
    index: list[int]                 # positions of the items in the caller's plan
    images: np.ndarray               # [B, H, W, 3] uint8
    step_scores: np.ndarray          # [B, steps - 1] score of the selected child per branching step (NaN: k = 1)
    spread: np.ndarray               # [B, steps - 1] max - min of the k scores
    score_std: np.ndarray            # [B, steps - 1]
    chosen: np.ndarray               # [B, steps - 1] int64
    final_score: np.ndarray | None   # [B] DRM score of the final latents at s = 0; None without a scorer
    seconds: float                   # wall time of the batch: encode, sample, decode, final score


class RemoteScorer:
    """A `DRMScorer` actor seen as a local scorer; every call waits at most `timeout_s`.

    Prompt embeddings are the same tensor at every step of a batch, so each is `ray.put` once and its reference
    reused (for SD3.5 they are tens of MB per call, far more than the latents).
    """

    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s
        self._held: list[tuple[torch.Tensor, object]] = []

    def score(self, latents, noise_levels, prompt_embeds, pooled) -> torch.Tensor:
        ref = self.actor.score.remote(latents.cpu(), noise_levels.cpu(), self._put(prompt_embeds), self._put(pooled))
        return self._get(ref, "score")

    __call__ = score

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None:
        self._get(self.actor.check_compatible.remote(transformer_config, latent_size), "check_compatible")

    def _put(self, tensor: torch.Tensor):
        import ray

        for held, ref in self._held:
            if held is tensor:
                return ref
        ref = ray.put(tensor.cpu())
        self._held = (self._held + [(tensor, ref)])[-2:]  # the current batch's embeds and pooled
        return ref

    def _get(self, ref, what: str):
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(f"the DRM scorer actor did not answer {what} within rollout.timeout_s="
                               f"{self.timeout_s:g}s") from err


class StepwiseSampler:
    def __init__(self, preset: str, model_kwargs: dict, *, num_steps: int, k: int, noise_level: float,
                 guidance_scale: float, negative_prompt: str = "", scorer: Scorer | None = None,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        if k > 1 and scorer is None:
            raise ValueError(f"k={k} needs a DRM scorer (--drm): it picks the best of the k children")
        self.comps = build_components(preset, **model_kwargs)
        self.max_sequence_length = model_kwargs["max_sequence_length"]
        self.latent_size = latent_size(preset, model_kwargs["resolution"])
        self.sigmas = schedule_sigmas(self.comps.scheduler, num_steps)
        self.k, self.noise_level, self.guidance_scale = k, noise_level, guidance_scale
        self.scorer = scorer
        if scorer is not None:
            scorer.check_compatible(dict(self.comps.transformer.config), self.latent_size)
        self.neg, self.neg_pooled = encode_prompts(self.comps, [negative_prompt], self.max_sequence_length)

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], index: list[int]) -> SampleBatch:
        start = time.perf_counter()
        b = len(prompts)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        embeds, pooled = encode_prompts(self.comps, prompts, self.max_sequence_length)  # [B, L, D], [B, P]
        device = self.comps.transformer.device
        x1 = initial_latents(b, self.comps.transformer.config.in_channels, self.latent_size, gens, device)
        res = stepwise_sample(self.comps.transformer, self.sigmas, embeds, pooled, x1, k=self.k,
                              noise_level=self.noise_level, generator=gens, scorer=self.scorer,
                              neg_embeds=self.neg.expand(b, -1, -1), neg_pooled=self.neg_pooled.expand(b, -1),
                              guidance_scale=self.guidance_scale)
        final = None
        if self.scorer is not None:
            final = self.scorer.score(res.latents, torch.zeros(b), embeds, pooled).float().cpu().numpy()  # [B]
        images = decode_latents(self.comps.vae, res.latents)                  # [B, 3, H, W] in [0, 1]
        images = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # as to_pil does
        return SampleBatch(index=list(index), images=images, step_scores=res.scores.numpy(),
                           spread=res.spread.numpy(), score_std=res.score_std.numpy(), chosen=res.chosen.numpy(),
                           final_score=final, seconds=time.perf_counter() - start)
