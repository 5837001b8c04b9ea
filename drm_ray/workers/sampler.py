"""StepwiseSampler: holds the SD3 transformer and VAE and samples batches of (prompt, seed) with Step-wise Sampling.

A plain class: `jobs/sample.py` uses it in-process, or the driver makes it a Ray actor next to `RewardScorer` actors
(`drm_ray.sample_driver`). Prompts are rows of a `PromptTable` encoded once by the job (zero-copy in the object store
on Ray), named by index, exactly as in the RL job. Each item gets its own `torch.Generator(seed)` for the initial
noise and every SDE draw, so an image depends on its prompt and seed only, not on the batch or the worker.

The scorer is a `RewardScorer` in the same process or a `RemoteScorer` around a `RewardScorer` actor: both answer
`score(latents, noise_levels, prompt_index, clean)`. It selects among the k children of every step (by the weighted
rewards; image rewards see each child's denoised estimate x0_hat, one extra policy forward per child) and scores the
final latents (at s = 0), which is what "the score of the selected samples" means in the outputs. Judges (another
`RewardScorer`) score the final latents only. With k = 1 the steps never call the scorer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from drm_ray.algorithms.advantages import combine_rewards
from drm_ray.data.prompt_table import resolve_table
from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.diffusion.sampling import decode_latents, denoised_estimate, initial_latents
from drm_ray.diffusion.stepwise import stepwise_sample
from drm_ray.models.sd3 import build_components, latent_size


@dataclass
class SampleBatch:
    index: list[int]                 # positions of the items in the caller's plan
    images: np.ndarray               # [B, H, W, 3] uint8
    step_scores: np.ndarray          # [B, steps - 1] score of the selected child per branching step (NaN: k = 1);
                                     # with several rewards their weighted sum, on the scale of final_score
    spread: np.ndarray               # [B, steps - 1] max - min of the k scores (as step_scores)
    score_std: np.ndarray            # [B, steps - 1]
    chosen: np.ndarray               # [B, steps - 1] int64
    final_score: np.ndarray | None   # [B] the (weighted) reward of the final latents at s = 0; None without a scorer
    seconds: float                   # wall time of the batch: sample, decode, final score
    judges: dict | None = None       # {name: [B]} judge scores of the final latents
    x0_forwards: int = 0             # policy forwards (CFG pairs) spent on x0_hat for image rewards


class RemoteScorer:
    """A `RewardScorer` actor seen as a local scorer; every call waits at most `timeout_s`."""

    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s

    def score(self, latents, noise_levels, prompt_index, clean=None) -> torch.Tensor:
        return self._get(self.actor.score.remote(latents.cpu(), noise_levels.cpu(), prompt_index,
                                                 None if clean is None else clean.cpu()), "score")

    def score_all(self, latents, noise_levels, prompt_index, clean=None) -> torch.Tensor:
        return self._get(self.actor.score_all.remote(latents.cpu(), noise_levels.cpu(), prompt_index,
                                                     None if clean is None else clean.cpu()), "score_all")

    def names(self) -> list[str]:
        return self._get(self.actor.names.remote(), "names")

    def weights(self) -> list[float]:
        return self._get(self.actor.weights.remote(), "weights")

    def needs_clean(self) -> bool:
        return self._get(self.actor.needs_clean.remote(), "needs_clean")

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None:
        self._get(self.actor.check_compatible.remote(transformer_config, latent_size), "check_compatible")

    def _get(self, ref, what: str):
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(f"the reward scorer actor did not answer {what} within rollout.timeout_s="
                               f"{self.timeout_s:g}s") from err


class StepwiseSampler:
    def __init__(self, preset: str, model_kwargs: dict, prompts, *, num_steps: int, k: int, noise_level: float,
                 guidance_scale: float, scorer=None, judges=None, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        if k > 1 and scorer is None:
            raise ValueError(f"k={k} needs a scorer (--drm or reward.rewards): it picks the best of the k children")
        self.comps = build_components(preset, text=False, **model_kwargs)
        self.prompts = resolve_table(prompts)  # PromptTable (the negative prompt included)
        self.latent_size = latent_size(preset, model_kwargs["resolution"])
        self.sigmas = schedule_sigmas(self.comps.scheduler, num_steps)
        self.k, self.noise_level, self.guidance_scale = k, noise_level, guidance_scale
        self.scorer, self.judges = scorer, judges
        self.judge_names = judges.names() if judges is not None else []  # asked once, not per batch
        self.needs_clean, self.weights = False, [1.0]
        if scorer is not None:
            scorer.check_compatible(dict(self.comps.transformer.config), self.latent_size)
            self.needs_clean, self.weights = bool(scorer.needs_clean()), list(scorer.weights())

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def sample(self, prompt_index: list[int], seeds: list[int], index: list[int]) -> SampleBatch:
        start = time.perf_counter()
        b = len(prompt_index)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        device = self.comps.transformer.device
        conds = self.prompts.rows(prompt_index, device)  # embeds, pooled, neg, neg_pooled [B, ...]
        x1 = initial_latents(b, self.comps.transformer.config.in_channels, self.latent_size, gens, device)
        pidx = torch.tensor(prompt_index, dtype=torch.long)
        x0_forwards = [0]
        weighted: list[torch.Tensor] = []  # several rewards: each step's weighted sums [B, k], what final_score is

        def select(children, levels, rows):  # the k children of every prompt at one step
            clean = None
            if self.needs_clean:
                embeds, pooled, neg, neg_pooled = (c[rows.to(c.device)] for c in conds)
                clean = denoised_estimate(self.comps.transformer, children, float(levels[0]), embeds, pooled, neg,
                                          neg_pooled, self.guidance_scale)
                x0_forwards[0] += children.shape[0]
            cols = self.scorer.score_all(children, levels, pidx[rows], clean)  # [B * k, R]
            if cols.shape[1] == 1:
                return cols[:, 0]
            # several rewards select by the weighted mean of each reward standardized over the k children (as RL
            # combines them); the step's record keeps the weighted sum, comparable across prompts and with the final
            weighted.append((cols.float() @ torch.tensor(self.weights)).view(b, self.k))
            return combine_rewards(cols.view(b, self.k, -1), self.weights, clip=float("inf"))[0].flatten()

        res = stepwise_sample(self.comps.transformer, self.sigmas, conds[0], conds[1], x1, k=self.k,
                              noise_level=self.noise_level, generator=gens,
                              scorer=select if self.scorer is not None else None, neg_embeds=conds[2],
                              neg_pooled=conds[3], guidance_scale=self.guidance_scale)
        scores, spread, score_std = res.scores, res.spread, res.score_std
        if weighted:
            steps = torch.stack(weighted, dim=1)  # [B, steps - 1, k]
            scores = steps.gather(2, res.chosen.unsqueeze(-1)).squeeze(-1)
            spread, score_std = steps.amax(-1) - steps.amin(-1), steps.std(-1, correction=0)
        zeros = torch.zeros(b)
        final = None
        if self.scorer is not None:
            final = self.scorer.score(res.latents, zeros, pidx).float().cpu().numpy()  # [B]
        judges = None
        if self.judges is not None:
            cols = self.judges.score_all(res.latents, zeros, pidx)  # [B, J]
            judges = {name: cols[:, j].float().numpy() for j, name in enumerate(self.judge_names)}
        images = decode_latents(self.comps.vae, res.latents)                  # [B, 3, H, W] in [0, 1]
        images = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # as to_pil does
        return SampleBatch(index=list(index), images=images, step_scores=scores.numpy(),
                           spread=spread.numpy(), score_std=score_std.numpy(), chosen=res.chosen.numpy(),
                           final_score=final, seconds=time.perf_counter() - start, judges=judges,
                           x0_forwards=x0_forwards[0])
