"""RolloutWorker: the frozen policy transformer with a LoRA slot, producing branching rollouts for groups of prompts.

A plain class; the driver makes it a Ray actor. It reads prompt embeddings from a `PromptTable` by index, draws all
noise from per-group generators (so a group's trajectory does not depend on which worker ran it or what else was in
its batch, up to floating-point batching effects), and records everything in float32 with the policy version.

Step-GRPO: one trajectory per group, branching k ways at each branching step; the trained states are the S states
before the branching steps, each with its k children. GRPO: k independent SDE trajectories per group (k = 1 at each
step), giving k * S trained states with one child each and k final images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from drm_ray.data.prompt_table import PromptTable, resolve_table
from drm_ray.diffusion.flow import schedule_sigmas
from drm_ray.diffusion.rollout import branching_rollout
from drm_ray.diffusion.sampling import denoise, denoised_estimate, initial_latents
from drm_ray.dispatch import StaleLoRAError
from drm_ray.models.lora import add_lora, load_lora_state, lora_checksum, lora_state
from drm_ray.models.sd3 import build_components, latent_size


@dataclass
class GroupLatents:
    """The large part of a group's rollout: what scorers and the learner read, never the driver."""
    states: torch.Tensor      # [T, C, h, w] trained states (T = S for step_grpo, k * S for grpo)
    children: torch.Tensor    # [T, m, C, h, w] (m = k for step_grpo, 1 for grpo)
    final: torch.Tensor       # [F, C, h, w] final latents (F = 1 for step_grpo, k for grpo)
    children_x0: torch.Tensor | None = None  # [T, m, C, h, w] x0_hat of each child, when image rewards score them

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.children, self.final, self.children_x0)
                   if t is not None)


@dataclass
class GroupRollout:
    group_id: int
    prompt_index: int
    seed: int
    version: int
    states: torch.Tensor | None    # [T, C, h, w]; None in the driver's copy (see `split_rollouts`)
    step_index: torch.Tensor       # [T] the sampling step of each state
    children: torch.Tensor | None  # [T, m, C, h, w]; None in the driver's copy
    log_probs: torch.Tensor        # [T, m] under policy `version`
    final: torch.Tensor | None     # [F, C, h, w]; None in the driver's copy
    num_final: int = 0             # F, kept when the latents are split off
    payload_bytes: int = 0         # bytes of the latents, kept when they are split off
    children_x0: torch.Tensor | None = None  # [T, m, C, h, w] x0_hat of each child (image rewards); else None
    chosen: torch.Tensor | None = None  # [T] the child each state's trajectory continued from (-1: the ODE mean)

    def __post_init__(self):
        if self.final is not None:
            self.num_final = self.final.shape[0]
            self.payload_bytes = self.latents().nbytes

    @property
    def num_children(self) -> int:
        return self.log_probs.numel()

    def latents(self) -> GroupLatents:
        return GroupLatents(self.states, self.children, self.final, self.children_x0)

    def with_latents(self, latents: GroupLatents) -> GroupRollout:
        return replace(self, states=latents.states, children=latents.children, final=latents.final,
                       children_x0=latents.children_x0)


def split_rollouts(rollouts: list[GroupRollout]) -> tuple[list[GroupRollout], list[GroupLatents]]:
    """(records without latents, for the driver; the latents, for the object store)."""
    small = [replace(r, states=None, children=None, final=None, children_x0=None) for r in rollouts]
    return small, [r.latents() for r in rollouts]


def join_rollouts(rollouts: list[GroupRollout], latents: list[GroupLatents]) -> list[GroupRollout]:
    """Inverse of `split_rollouts` (on a scorer)."""
    if len(rollouts) != len(latents):
        raise ValueError(f"{len(rollouts)} rollout records but {len(latents)} latent payloads")
    return [r.with_latents(lat) for r, lat in zip(rollouts, latents)]


def group_generators(seed: int, count: int) -> list[torch.Generator]:
    """Independent generators for the `count` trajectories of one group."""
    return [torch.Generator().manual_seed(seed * 1000 + j) for j in range(count)]


class RolloutWorker:
    def __init__(self, preset: str, model_kwargs: dict, lora: dict, prompts: PromptTable, sampling: dict,
                 algo: str = "step_grpo", torch_threads: int = 1, scorer=None, x0_children: bool = False,
                 timeout_s: float = 600.0):
        torch.set_num_threads(torch_threads)
        comps = build_components(preset, text=False, vae=False, **model_kwargs)
        self.transformer = comps.transformer
        self.lora = lora
        add_lora(self.transformer, lora["rank"], lora["alpha"], tuple(lora["target_modules"]))
        self.transformer.requires_grad_(False).eval()
        self.device = self.transformer.device
        self.prompts = resolve_table(prompts)
        self.s = sampling
        self.algo = algo
        self.sigmas = schedule_sigmas(comps.scheduler, sampling["num_steps"])
        self.scheduler = comps.scheduler
        self.latent_size = latent_size(preset, model_kwargs["resolution"])
        # continuation=best asks a RewardScorer which child continues: the actor, or its name (the driver names its
        # scorers so that a restartable worker's constructor takes a string, not an actor handle)
        self.scorer = _actor(scorer) if isinstance(scorer, str) else scorer
        self.x0_children = x0_children  # image rewards score the children's denoised estimates x0_hat
        self.timeout_s = timeout_s
        self.version = -1  # no adapter state loaded from the learner yet

    def ready(self) -> int:
        return self.version

    def set_lora(self, version: int, state: dict[str, torch.Tensor]) -> str:
        """Load adapter `version` (keys, shapes and dtype checked); returns its checksum."""
        load_lora_state(self.transformer, state)
        self.version = version
        return lora_checksum(lora_state(self.transformer))

    def lora_checksum(self) -> str:
        return lora_checksum(lora_state(self.transformer))

    def transformer_config(self) -> dict:
        return dict(self.transformer.config)

    def _x0(self, children: torch.Tensor, sigma: float, rows: torch.Tensor, conds) -> torch.Tensor:
        """x0_hat of children [N, C, h, w] at noise level sigma; rows: each child's batch row in `conds`."""
        embeds, pooled, neg, neg_pooled = (c[rows.to(c.device)] for c in conds)
        return denoised_estimate(self.transformer, children, sigma, embeds, pooled, neg, neg_pooled,
                                 self.s["guidance_scale"])

    def _best_scorer(self, prompt_index: list[int], conds, x0_steps: list):
        """continuation=best: the RewardScorer actor scores a step's children (by prompt index; with their x0_hat
        when image rewards are among the rewards, kept in `x0_steps` for the rollout record), waiting at most
        timeout_s."""
        import ray

        index = torch.tensor(prompt_index, dtype=torch.long)

        def score(children, levels, rows):
            clean = None
            if self.x0_children:
                clean = self._x0(children, float(levels[0]), rows, conds)
                x0_steps.append(clean)  # [B * k, ...] in the order the record stacks them: not computed again
                clean = clean.cpu()
            ref = self.scorer.score.remote(children.cpu(), levels, index[rows], clean)
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as err:
                raise TimeoutError(f"the reward scorer did not answer within rollout.timeout_s={self.timeout_s:g}s "
                                   "(continuation=best)") from err
        return score

    @torch.no_grad()
    def rollout(self, groups: list[tuple[int, int, int]], version: int) -> list[GroupRollout]:
        """groups: (group_id, prompt_index, seed) -> one GroupRollout each, in order, sampled by policy `version`."""
        if version != self.version:
            raise StaleLoRAError(f"rollout asked for policy v{version} but this worker holds v{self.version}")
        s, k = self.s, self.s["k"]
        per_group = 1 if self.algo == "step_grpo" else k
        idx = [p for _, p, _ in groups for _ in range(per_group)]
        gens = [g for _, _, seed in groups for g in group_generators(seed, per_group)]
        conds = self.prompts.rows(idx, self.device)  # embeds, pooled, neg, neg_pooled [B, ...]
        if s.get("shared_initial_noise") and per_group > 1:  # one x_1 per group, from its first trajectory's generator
            x1 = initial_latents(len(groups), self.transformer.config.in_channels, self.latent_size,
                                 gens[::per_group], self.device).repeat_interleave(per_group, dim=0)
        else:
            x1 = initial_latents(len(idx), self.transformer.config.in_channels, self.latent_size, gens, self.device)
        continuation = s["continuation"] if self.algo == "step_grpo" else "random"
        x0_steps: list[torch.Tensor] = []  # continuation=best: each branching step's x0_hat, as its scorer made it
        out = branching_rollout(
            self.transformer, self.sigmas, x1, *conds, s["guidance_scale"],
            s["noise_level"], k if self.algo == "step_grpo" else 1, tuple(s["branch_steps"]), gens, continuation,
            self._best_scorer(idx, conds, x0_steps) if continuation == "best" else None)
        steps = torch.tensor(out.steps, dtype=torch.long)
        x0 = None
        if self.x0_children and self.algo == "step_grpo":  # [B, S, k, C, h, w]: what image rewards score
            b, n_steps, m = out.children.shape[:3]
            rows = torch.arange(b).repeat_interleave(m)
            if len(x0_steps) != n_steps:  # one policy forward per child, here or in the best-child scorer
                x0_steps = [self._x0(out.children[:, j].flatten(0, 1), float(self.sigmas[i + 1]), rows, conds)
                            for j, i in enumerate(out.steps)]
            x0 = torch.stack([c.view(b, m, *out.children.shape[3:]) for c in x0_steps], dim=1)
        results = []
        for g, (gid, pidx, seed) in enumerate(groups):
            sl = slice(g * per_group, (g + 1) * per_group)  # this group's trajectories
            results.append(GroupRollout(
                group_id=gid, prompt_index=pidx, seed=seed, version=self.version,
                states=out.states[sl].flatten(0, 1).cpu(),          # [per_group * S, C, h, w]
                step_index=steps.repeat(per_group),
                children=out.children[sl].flatten(0, 1).cpu(),      # [per_group * S, m, C, h, w]
                log_probs=out.log_probs[sl].flatten(0, 1).cpu(),    # [per_group * S, m]
                final=out.final[sl].cpu(),                          # [per_group, C, h, w]
                children_x0=None if x0 is None else x0[sl].flatten(0, 1).cpu(),
                chosen=out.chosen[sl].flatten(0, 1).cpu(),          # [per_group * S]
            ))
        return results

    def rollout_split(self, groups: list[tuple[int, int, int]],
                      version: int) -> tuple[list[GroupRollout], list[GroupLatents]]:
        """`rollout`, for a Ray call with `num_returns=2`: (records for the driver, latents for the object store)."""
        return split_rollouts(self.rollout(groups, version))

    @torch.no_grad()
    def sample_panel(self, prompt_indices: list[int], seeds: list[int], num_steps: int) -> torch.Tensor:
        """ODE samples of the current policy for fixed prompts and seeds: final latents [B, C, h, w] (CPU)."""
        gens = [torch.Generator().manual_seed(sd) for sd in seeds]
        embeds, pooled, neg, neg_pooled = self.prompts.rows(prompt_indices, self.device)
        x1 = initial_latents(len(seeds), self.transformer.config.in_channels, self.latent_size, gens, self.device)
        sigmas = schedule_sigmas(self.scheduler, num_steps)
        latents = denoise(self.transformer, sigmas, embeds, pooled, neg, neg_pooled, self.s["guidance_scale"],
                          0.0, x1)
        return latents.cpu()

    def schedule(self) -> torch.Tensor:
        """The sigmas of the rollout schedule ([num_steps + 1], float32)."""
        return self.sigmas


def _actor(name: str):
    import ray

    return ray.get_actor(name)
