"""DRMScorer: batched R(x_s, s, c) over a trained DRM directory. A plain class; the driver makes it a Ray actor.

Stateless between calls (the DRM weights are read-only), so a restarted actor serves exactly as before and several
scorers can serve several rollout workers. Prompts are named by index into a `PromptTable` (zero-copy in the object
store); in the RL loop the scorer fetches the rollout latents itself (`score_rollouts`) and returns only scores.
"""

from __future__ import annotations

import torch

from drm_ray.algorithms.rl_batch import scoring_requests
from drm_ray.models.sd3 import default_device, torch_dtype
from drm_ray.reward.model import DiffusionRewardModel


class DRMScorer:
    def __init__(self, drm_path: str, dtype: str | None = None, max_batch: int = 64, torch_threads: int = 1,
                 prompts=None):
        torch.set_num_threads(torch_threads)
        self.prompts = prompts  # a PromptTable, so requests can name prompts by index
        self.device = default_device()
        self.drm = DiffusionRewardModel.from_pretrained(drm_path, device=self.device,
                                                        dtype=torch_dtype(dtype) if dtype else None)
        self.drm.requires_grad_(False)
        self.max_batch = max_batch

    def ready(self) -> bool:
        return True

    def transformer_config(self) -> dict:
        return dict(self.drm.transformer_config)

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None:
        self.drm.check_compatible(transformer_config, latent_size)

    @torch.no_grad()
    def score(self, latents: torch.Tensor, noise_levels: torch.Tensor, prompt_embeds: torch.Tensor,
              pooled: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """latents [N, C, h, w], noise_levels [N], prompt_embeds [N, L, D], pooled [N, P] -> rewards [N] (CPU fp32).
        With `rows` [N], latent i is scored with prompt row rows[i] of prompt_embeds / pooled ([U, ...])."""
        out = []
        for lo in range(0, latents.shape[0], self.max_batch):
            hi = lo + self.max_batch
            sel = slice(lo, hi) if rows is None else rows[lo:hi]
            r = self.drm(latents[lo:hi].to(self.device), noise_levels[lo:hi].to(self.device),
                         prompt_embeds[sel].to(self.device), pooled[sel].to(self.device))
            out.append(r.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score_indexed(self, latents: torch.Tensor, noise_levels: torch.Tensor,
                      prompt_indices: torch.Tensor) -> torch.Tensor:
        """As `score`, with prompts named by index into the PromptTable given at construction. Each distinct
        prompt's embeddings are gathered once and moved to the device in the DRM's dtype (a chunk of 4 groups holds
        220 children but 4 prompts)."""
        if self.prompts is None:
            raise ValueError("this scorer was built without a prompt table")
        distinct, rows = torch.unique(torch.as_tensor(prompt_indices, dtype=torch.long), return_inverse=True)
        embeds, pooled, _, _ = self.prompts.rows(distinct, self.device, self.drm.dtype)  # [U, L, D], [U, P]
        return self.score(latents, noise_levels, embeds, pooled, rows.to(self.device))

    def score_rollouts(self, rollouts: list, latent_refs: list, algo: str, sigmas: torch.Tensor) -> torch.Tensor:
        """Scores of everything `scoring_requests` asks for: `rollouts` are the records without latents,
        `latent_refs` (nested in a list, so Ray passes them unresolved) the object-store payloads holding their
        latents, in order (lists of `GroupLatents`). Only the scores [N] go back."""
        import ray

        from drm_ray.workers.rollout import join_rollouts

        latents = [g for chunk in ray.get(list(latent_refs)) for g in chunk]
        return self.score_indexed(*scoring_requests(join_rollouts(rollouts, latents), algo, sigmas))

    __call__ = score
