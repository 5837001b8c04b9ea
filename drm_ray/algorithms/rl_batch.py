"""From group rollouts and DRM scores to the learner's batch: pure tensor bookkeeping, no Ray.

Step-GRPO: each branching state is a group of its k children; the children's DRM scores (at the children's noise
level) are normalized within the group and become the children's advantages. GRPO: the k final images of a prompt
are scored at s = 0, normalized over the prompt's k images, and each image's advantage is repeated on every trained
step of its trajectory. Groups with a non-finite score are dropped (counted in `adv/dropped_groups`).

Everything here but `scoring_requests` and `gather_states` works from the small part of the rollouts (step
indices, log-probs, counts), so on the driver the latents can stay in the object store: the learner batch names its
states by `state_index` (position in the concatenation of all rollouts' states) and each learner rank gathers the
latents of its cells itself (`gather_states`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drm_ray.algorithms.advantages import grpo_advantages, step_group_advantages
from drm_ray.algorithms.ranking import spearman


def scoring_requests(rollouts, algo: str, sigmas: torch.Tensor):
    """Everything the rewards must score for these rollouts, flattened: latents [N, C, h, w], noise levels [N], prompt
    indices [N], and the clean estimates [N, C, h, w] image rewards score instead (x0_hat of each child, the final
    latent itself), or None when the rollouts carry no x0_hat. Step-GRPO: every child (at sigma of the step it
    lands on) and every final latent (s = 0); GRPO: the final latents only."""
    lat, lvl, idx, clean = [], [], [], []
    with_x0 = algo == "step_grpo" and bool(rollouts) and rollouts[0].children_x0 is not None
    for r in rollouts:
        if algo == "step_grpo":
            t, m = r.children.shape[:2]
            lat.append(r.children.flatten(0, 1))  # [T * m, C, h, w]
            lvl.append(sigmas[r.step_index + 1].repeat_interleave(m))
            idx.append(torch.full((t * m,), r.prompt_index))
            if with_x0:
                clean.append(r.children_x0.flatten(0, 1))
        lat.append(r.final)
        lvl.append(torch.zeros(r.final.shape[0]))
        idx.append(torch.full((r.final.shape[0],), r.prompt_index))
        clean.append(r.final)
    return torch.cat(lat), torch.cat(lvl).float(), torch.cat(idx).long(), torch.cat(clean) if with_x0 else None


def num_scored(rollouts, algo: str) -> int:
    """How many latents `scoring_requests` asks the DRM to score (from the small part of the rollouts)."""
    return sum((r.num_children if algo == "step_grpo" else 0) + r.num_final for r in rollouts)


def split_scores(rollouts, algo: str, scores: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inverse of `scoring_requests`: child scores per rollout ([T, m] each; empty for GRPO) and final scores [G, F];
    scores [N, R] (R rewards) give [T, m, R] and [G, F, R]."""
    child, final, pos = [], [], 0
    for r in rollouts:
        if algo == "step_grpo":
            t, m = r.log_probs.shape
            child.append(scores[pos:pos + t * m].view(t, m, *scores.shape[1:]))
            pos += t * m
        f = r.num_final
        final.append(scores[pos:pos + f])
        pos += f
    return child, torch.stack(final)


def learner_batch(rollouts, algo: str, child_scores: list[torch.Tensor], final_scores: torch.Tensor,
                  num_branch_steps: int, adv_clip: float, weights: list[float] | None = None,
                  first_state: int = 0, adv_norm: str = "std") -> tuple[dict, dict]:
    """The learner's update batch (valid states only) and advantage stats. With `weights`, the scores carry a last
    dimension of R rewards, combined at the advantage level (`combine_rewards`). A group's advantages depend on its
    own scores only, so the batch of some of the groups (a rollout chunk, its states numbered from `first_state`) is
    exactly that part of the whole batch.

    Batch: state_index [N], step_index [N], prompt_index [N], old_log_probs [N, m], advantages [N, m]; when the
    rollouts carry their latents (in-process use) also states [N, C, h, w] and children [N, m, C, h, w].
    """
    if algo == "step_grpo":
        adv, valid, stats = step_group_advantages(torch.stack(child_scores), adv_clip, weights, adv_norm)  # [G, S, k], [G, S]
    else:
        g, k = final_scores.shape[:2]
        adv_gsk, valid_gs, stats = grpo_advantages(final_scores, num_branch_steps, adv_clip, weights,
                                                   adv_norm)  # [G, S, k]
        adv = adv_gsk.permute(0, 2, 1).reshape(g, k * num_branch_steps, 1)  # trajectory-major, as states are stored
        valid = valid_gs[:, :1].expand(-1, k * num_branch_steps)
    keep = valid.flatten()  # [G * T]
    cat = lambda name: torch.cat([getattr(r, name) for r in rollouts])  # noqa: E731
    batch = {
        "state_index": torch.arange(keep.numel()) + first_state, "step_index": cat("step_index"),
        "prompt_index": torch.cat([torch.full((r.step_index.shape[0],), r.prompt_index) for r in rollouts]),
        "old_log_probs": cat("log_probs"), "advantages": adv.flatten(0, 1).float(),
    }
    batch = {k: v[keep] for k, v in batch.items()}
    if rollouts and rollouts[0].states is not None:
        n = sum(r.step_index.shape[0] for r in rollouts)
        batch["states"], batch["children"] = gather_states(batch["state_index"], [(first_state, n, rollouts)])
    stats["adv/kept_states"] = float(keep.sum().item())
    return batch, stats


@dataclass(frozen=True)
class IterationLayout:
    """How one iteration's states are dealt to the learner, fixed before any of them is scored.

    The states are numbered group by group (`groups` prompt groups of `per_group` states each, in the sampler's
    order; a dropped group keeps its numbers). Minibatch j (one optimizer step) is the j-th of `updates` contiguous,
    near-equal runs of whole groups; it is cut into `accum` rows of `world` cells, cell (row a, rank r) being slice
    a * world + r of `accum * world` near-equal slices of the minibatch's state numbers. So every boundary depends on
    the group count alone, never on which groups were dropped or when they were scored: a cell can be trained as soon
    as the groups it covers are scored (the pipelined schedule), and the serial schedule deals the same cells.
    A minibatch's loss is the mean over all its states, a dropped group's counting as zero (as a zero-advantage group
    does in Flow-GRPO), so the normalizer too is known before scoring.
    """

    groups: int
    per_group: int
    updates: int = 1
    world: int = 1
    accum: int = 1

    def group_bounds(self, j: int) -> tuple[int, int]:
        """Groups [lo, hi) of minibatch j."""
        b = torch.linspace(0, self.groups, self.updates + 1).round().long().tolist()
        return b[j], b[j + 1]

    def total(self, j: int) -> int:
        """States of minibatch j, dropped groups included (its loss normalizer)."""
        lo, hi = self.group_bounds(j)
        return (hi - lo) * self.per_group

    def cell_bounds(self, j: int, row: int, rank: int) -> tuple[int, int]:
        """State numbers [lo, hi) of cell (row, rank) of minibatch j."""
        lo, hi = self.group_bounds(j)
        b = torch.linspace(lo * self.per_group, hi * self.per_group, self.accum * self.world + 1).round().long()
        i = row * self.world + rank
        return int(b[i]), int(b[i + 1])

    def row_groups(self, j: int, row: int) -> tuple[int, int]:
        """Groups [lo, hi) that row `row` of minibatch j touches (on any rank): what must be scored before it."""
        lo, _ = self.cell_bounds(j, row, 0)
        _, hi = self.cell_bounds(j, row, self.world - 1)
        return lo // self.per_group, -(-hi // self.per_group)


def grad_accum(states: int, updates_per_iter: int, num_workers: int, micro_batch_states: int,
               per_group: int = 1) -> int:
    """Backward calls per optimizer step: the largest minibatch (groups of `per_group` states / updates_per_iter,
    rounded up: `IterationLayout`) over the ranks in micro-batches of `micro_batch_states`."""
    per_step = math.ceil(states // per_group / updates_per_iter) * per_group
    return max(1, math.ceil(per_step / (num_workers * micro_batch_states)))


def select_states(batch: dict, lo: int, hi: int) -> dict:
    """The rows of `batch` whose state numbers lie in [lo, hi)."""
    keep = (batch["state_index"] >= lo) & (batch["state_index"] < hi)
    return {k: v[keep] for k, v in batch.items()}


def minibatch_shards(batch: dict, layout: IterationLayout) -> tuple[list[list[list[dict]]], list[int]]:
    """Deal a whole update batch by `layout` (in-process use; the Coordinator deals the same cells as groups are
    scored). Returns (cells[rank][minibatch][row], states per minibatch with dropped groups counted)."""
    cells = [[[select_states(batch, *layout.cell_bounds(j, a, r)) for a in range(layout.accum)]
              for j in range(layout.updates)] for r in range(layout.world)]
    return cells, [layout.total(j) for j in range(layout.updates)]


def chunk_sources(state_index: torch.Tensor, chunks: list[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    """The chunks, (first state number, states, latents) each, that hold any of the states `state_index` names."""
    return [c for c in chunks if bool(((state_index >= c[0]) & (state_index < c[0] + c[1])).any())]


def gather_states(state_index: torch.Tensor, chunks: list[tuple[int, int, list]]) -> tuple[torch.Tensor, ...]:
    """(states [N, C, h, w], children [N, m, C, h, w]) of the states `state_index` names, from `chunks`: (first
    state number, states, groups) each, the groups being anything with `.states` and `.children` in order; the
    chunks must hold every named state (a learner rank fetches only those of its cell: `chunk_sources`)."""
    chunks = sorted(chunks, key=lambda c: c[0])
    if not state_index.numel():  # an empty cell (dropped groups): empty tensors of the right shape
        g = chunks[0][2][0]
        return g.states[:0], g.children[:0]
    states = torch.cat([g.states for _, _, groups in chunks for g in groups])
    children = torch.cat([g.children for _, _, groups in chunks for g in groups])
    starts = torch.tensor([c[0] for c in chunks])
    offsets = torch.tensor([0] + [c[1] for c in chunks[:-1]]).cumsum(0)  # first row of each chunk in `states`
    which = torch.searchsorted(starts, state_index, right=True) - 1
    ends = starts + torch.tensor([c[1] for c in chunks])
    if (which < 0).any() or (state_index >= ends[which.clamp(min=0)]).any():
        raise ValueError("gather_states: a named state is in none of the given chunks")
    rows = state_index - starts[which] + offsets[which]
    return states[rows], children[rows]


def reward_stats(rollouts, algo: str, child_scores: list[torch.Tensor], final_scores: torch.Tensor,
                 branch_steps: tuple[int, ...]) -> dict[str, float]:
    """reward/* metrics: mean and std per branching step (Step-GRPO) and of the final samples (both); for Step-GRPO
    also, per branching step, Spearman's rho over the groups between the score of the child each trajectory
    continued from and the final image's score (`reward/step{i}_final_spearman`): how well the step reward
    predicts the outcome at that noise level (rewards at high noise are weak; this shows where)."""
    out = {}
    finite = final_scores[torch.isfinite(final_scores)]
    out["reward/final_mean"] = finite.mean().item() if finite.numel() else float("nan")
    out["reward/final_std"] = finite.std(unbiased=False).item() if finite.numel() else float("nan")
    if algo == "step_grpo" and child_scores:
        per_step = torch.stack(child_scores)  # [G, S, k]
        for j, step in enumerate(branch_steps):
            vals = per_step[:, j][torch.isfinite(per_step[:, j])]
            out[f"reward/step{step}_mean"] = vals.mean().item() if vals.numel() else float("nan")
            out[f"reward/step{step}_std"] = vals.std(unbiased=False).item() if vals.numel() else float("nan")
        if rollouts and rollouts[0].chosen is not None and len(rollouts) >= 3:
            chosen = torch.stack([r.chosen for r in rollouts])  # [G, S]
            for j, step in enumerate(branch_steps):
                pick = chosen[:, j]
                if (pick < 0).any():  # continuation=mean: no child continued
                    continue
                continued = per_step[:, j].gather(1, pick[:, None])[:, 0]  # [G]
                out[f"reward/step{step}_final_spearman"] = spearman(continued.numpy(), final_scores[:, 0].numpy())
    return out
