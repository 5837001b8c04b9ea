"""From group rollouts and DRM scores to the learner's batch: pure tensor bookkeeping, no Ray.

Step-GRPO: each branching state is a group of its k children; the children's DRM scores (at the children's noise
level) are normalized within the group and become the children's advantages. GRPO: the k final images of a prompt
are scored at s = 0, normalized over the prompt's k images, and each image's advantage is repeated on every trained
step of its trajectory. Groups with a non-finite score are dropped (counted in `adv/dropped_groups`).

Everything here but `scoring_requests` and `gather_latents` works from the small part of the rollouts (step
indices, log-probs, counts), so on the driver the latents can stay in the object store: the learner batch names its
states by `state_index` (position in the concatenation of all rollouts' states) and each learner rank gathers the
latents of its shard itself (`gather_latents`).
"""

from __future__ import annotations

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
                  num_branch_steps: int, adv_clip: float, weights: list[float] | None = None) -> tuple[dict, dict]:
    """The learner's update batch (valid states only) and advantage stats. With `weights`, the scores carry a last
    dimension of R rewards, combined at the advantage level (`combine_rewards`).

    Batch: state_index [N], step_index [N], prompt_index [N], old_log_probs [N, m], advantages [N, m]; when the
    rollouts carry their latents (in-process use) also states [N, C, h, w] and children [N, m, C, h, w].
    """
    if algo == "step_grpo":
        adv, valid, stats = step_group_advantages(torch.stack(child_scores), adv_clip, weights)  # [G, S, k], [G, S]
    else:
        g, k = final_scores.shape[:2]
        adv_gsk, valid_gs, stats = grpo_advantages(final_scores, num_branch_steps, adv_clip, weights)  # [G, S, k]
        adv = adv_gsk.permute(0, 2, 1).reshape(g, k * num_branch_steps, 1)  # trajectory-major, as states are stored
        valid = valid_gs[:, :1].expand(-1, k * num_branch_steps)
    keep = valid.flatten()  # [G * T]
    cat = lambda name: torch.cat([getattr(r, name) for r in rollouts])  # noqa: E731
    batch = {
        "state_index": torch.arange(keep.numel()), "step_index": cat("step_index"),
        "prompt_index": torch.cat([torch.full((r.step_index.shape[0],), r.prompt_index) for r in rollouts]),
        "old_log_probs": cat("log_probs"), "advantages": adv.flatten(0, 1).float(),
    }
    batch = {k: v[keep] for k, v in batch.items()}
    if rollouts and rollouts[0].states is not None:
        sizes = [sum(r.step_index.shape[0] for r in rollouts)]
        batch["states"], batch["children"] = gather_latents(batch["state_index"], [rollouts], sizes)
    stats["adv/kept_states"] = float(keep.sum().item())
    return batch, stats


def minibatch_shards(batch: dict, updates: int, world: int) -> tuple[list[list[dict]], list[int]]:
    """Deal an update batch as `updates` minibatches (one optimizer step each) over `world` ranks.

    Minibatch j is the j-th of `updates` contiguous, near-equal slices of the batch, which is stored group by group
    (groups in the sampler's random prompt order, each with all its steps): a minibatch holds whole groups but at
    its edges, so it can be trained as soon as its groups are scored, and its boundaries depend only on the batch,
    never on the number of ranks. Returns (shards[rank][minibatch], states per minibatch): rank r takes its
    contiguous part of each minibatch.
    """
    n = batch["advantages"].shape[0]
    mb_bounds = torch.linspace(0, n, updates + 1).round().long().tolist()
    shards: list[list[dict]] = [[] for _ in range(world)]
    totals = []
    for lo, hi in zip(mb_bounds[:-1], mb_bounds[1:]):
        totals.append(hi - lo)
        rank_bounds = torch.linspace(lo, hi, world + 1).round().long().tolist()
        for rank, (a, b) in enumerate(zip(rank_bounds[:-1], rank_bounds[1:])):
            shards[rank].append({k: v[a:b] for k, v in batch.items()})
    return shards, totals


def chunks_needed(state_index: torch.Tensor, chunk_sizes: list[int]) -> list[int]:
    """Which chunks (consecutive runs of `chunk_sizes[c]` states) hold the states `state_index` names."""
    ends = torch.tensor(chunk_sizes, dtype=torch.long).cumsum(0)
    needed = torch.searchsorted(ends, state_index, right=True).unique().tolist()
    return needed or [0]  # an empty shard still needs one chunk for the latents' shapes


def gather_latents(state_index: torch.Tensor, chunks: list, chunk_sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """(states [N, C, h, w], children [N, m, C, h, w]) of the states `state_index` names.

    `chunks[c]` is a list of groups (anything with `.states` and `.children`) holding `chunk_sizes[c]` states in
    order; chunks that hold none of the states may be None (a learner rank fetches only the chunks of its shard).
    """
    ends = torch.tensor(chunk_sizes, dtype=torch.long).cumsum(0)
    chunk_of = torch.searchsorted(ends, state_index, right=True)  # [N]
    needed = chunk_of.unique().tolist()
    if not needed:  # an empty shard (dropped groups): empty tensors of the right shape
        g = next(g for chunk in chunks if chunk for g in chunk)
        return g.states[:0], g.children[:0]
    states = torch.cat([g.states for c in needed for g in chunks[c]])  # [sum of the needed chunks' T, C, h, w]
    children = torch.cat([g.children for c in needed for g in chunks[c]])
    starts = ends - torch.tensor(chunk_sizes, dtype=torch.long)  # first global state of each chunk
    local = torch.zeros(len(chunk_sizes), dtype=torch.long)  # first row of each needed chunk in `states`
    local[needed] = torch.tensor([0] + [chunk_sizes[c] for c in needed[:-1]]).cumsum(0)
    rows = state_index - starts[chunk_of] + local[chunk_of]
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
