"""RewardScorer: the one scoring actor. A plain class; the driver makes it a Ray actor.

    score(latents [N, C, h, w], noise_levels [N], prompt_index [N], clean=None) -> [N]   (the weighted sum)
    score_all(...) -> [N, R]                                                            (one column per reward)

It holds a `RewardSet` (drm_ray/reward/rewards.py: the DRM, CLIP-family models, the toy oracle, plug-ins) over the
job's `PromptTable` (zero-copy in the object store), so requests name prompts by index and never carry embeddings.
Stateless between calls (the weights are read-only): a restarted actor serves exactly as before, and several
scorers can serve several rollout workers. Step-GRPO, GRPO, Step-wise Sampling and evaluation (judges) all call
this class. In the RL loop the scorer fetches the rollout latents itself (`score_rollouts`) and returns only scores.
"""

from __future__ import annotations

import torch

from drm_ray.algorithms.rl_batch import scoring_requests
from drm_ray.data.prompt_table import resolve_table
from drm_ray.models.sd3 import torch_dtype
from drm_ray.reward.rewards import RewardSet
from drm_ray.reward.specs import parse_spec


def scorer_kwargs(cfg, specs: tuple[str, ...] | list[str], drm_path=None, dtype: str | None = None) -> dict:
    """RewardScorer's keyword arguments from a job config (every job builds them here)."""
    return dict(specs=list(specs), preset=cfg.model.preset, model_path=cfg.model.path,
                resolution=cfg.sampling.resolution, seed=cfg.model.seed,
                drm_path=str(drm_path) if drm_path else cfg.reward.drm_path, clip_path=cfg.reward.clip_path,
                callable_target=cfg.reward.callable, dtype=dtype)


class RewardScorer:
    def __init__(self, specs, prompts, *, preset: str, model_path: str | None = None, resolution: int = 64,
                 seed: int = 0, drm_path: str | None = None, clip_path: str | None = None,
                 callable_target: str | None = None, dtype: str | None = None, max_batch: int = 64,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.prompts = prompts = resolve_table(prompts)
        self.rewards = RewardSet([parse_spec(s) for s in specs], prompts, preset=preset, model_path=model_path,
                                 resolution=resolution, seed=seed, drm_path=drm_path, clip_path=clip_path,
                                 callable_target=callable_target, dtype=torch_dtype(dtype) if dtype else None,
                                 max_batch=max_batch)

    def ready(self) -> bool:
        return True

    def names(self) -> list[str]:
        return self.rewards.names

    def weights(self) -> list[float]:
        return self.rewards.weights

    def needs_clean(self) -> bool:
        return self.rewards.needs_clean

    def check_compatible(self, transformer_config: dict, latent_size: int) -> None:
        """Raise if a DRM of this scorer's cannot score this policy's latents and prompt embeddings."""
        for drm in self.rewards.drms():
            drm.drm.check_compatible(transformer_config, latent_size)

    def score_all(self, latents: torch.Tensor, noise_levels: torch.Tensor, prompt_index: torch.Tensor,
                  clean: torch.Tensor | None = None) -> torch.Tensor:
        return self.rewards.score_all(latents, noise_levels, torch.as_tensor(prompt_index), clean)

    def score(self, latents: torch.Tensor, noise_levels: torch.Tensor, prompt_index: torch.Tensor,
              clean: torch.Tensor | None = None) -> torch.Tensor:
        return self.rewards.score(latents, noise_levels, torch.as_tensor(prompt_index), clean)

    def score_rollouts(self, rollouts: list, latent_refs: list, algo: str, sigmas: torch.Tensor) -> torch.Tensor:
        """Scores [N, R] of everything `scoring_requests` asks for: `rollouts` are the records without latents,
        `latent_refs` (nested in a list, so Ray passes them unresolved) the object-store payloads holding their
        latents, in order (lists of `GroupLatents`). Only the scores go back."""
        import ray

        from drm_ray.workers.rollout import join_rollouts

        latents = [g for chunk in ray.get(list(latent_refs)) for g in chunk]
        return self.score_all(*scoring_requests(join_rollouts(rollouts, latents), algo, sigmas))
