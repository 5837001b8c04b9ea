"""The Step-GRPO / GRPO learner: the loop each Ray Train worker runs inside ONE long-lived `TorchTrainer.fit()`.

Each rank holds the frozen transformer with a LoRA adapter under DeepSpeed (ZeRO-2 over the LoRA parameters only;
fp32 on CPU with gloo, bf16 on GPU). It pulls its cells of every update from the Coordinator actor, one at a time:
`grpo.updates_per_iter` minibatches (one optimizer step each, as Flow-GRPO), each of exactly `grad_accum` rows of one
cell per rank (`IterationLayout`: the DeepSpeed gradient-accumulation count equals the backward calls per optimizer
step; an empty cell still runs a zero backward so every rank takes part in every reduction). In the pipelined
schedule a cell arrives as soon as the groups it covers are scored, so the learner works while later groups are
still being rolled out and scored; the serial schedule sends the same cells after scoring, with the same result.

Per recorded state one forward (the CFG pair) gives the mean of the step; all m children of that state are scored
against it (m = k for Step-GRPO, 1 for GRPO), so learner cost grows with the number of states, not of children.
Loss per state: mean over children of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta * KL(mu_theta || mu_ref),
the reference being the same network with the adapter disabled. After each update rank 0 publishes the LoRA state
(CPU tensors, `publish_dtype`) with its version through the object store.

Data plane: a rank's work carries small tensors (state indices, steps, prompt indices, log-probs, advantages) and the
ObjectRefs of the rollout latent chunks; the rank fetches only the chunks its cells touch (each once per update) and
gathers its states and children itself (`load_cell`), so the cells are exactly those of a batch assembled in one
process. Every `state_every` updates the LoRA + optimizer state is saved for Ray Train restarts,
after the new version is published, so the save overlaps the driver's sync and the next rollout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from drm_ray.algorithms.losses import clipped_policy_loss
from drm_ray.algorithms.rl_batch import gather_states
from drm_ray.diffusion.flow import gaussian_kl, gaussian_log_prob, sde_mean_per_item, schedule_sigmas
from drm_ray.diffusion.sampling import predict_velocity
from drm_ray.models.lora import adapter_disabled, add_lora, lora_norm, lora_state
from drm_ray.models.sd3 import torch_dtype
from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine, train_worker_setup

DS_TAG = "learner"


def state_losses(model, transformer, mb: dict, prompts, sigmas: torch.Tensor, cfg: dict, on_policy: bool = False):
    """Per-state loss [n] and per-child stats for one micro-batch (see module docstring).

    mb: states [n, C, h, w], step_index [n], prompt_index [n], children [n, m, C, h, w], old_log_probs [n, m],
    advantages [n, m]. `model` is what runs the forward (the DeepSpeed engine), `transformer` the module under it.
    `on_policy`: the parameters are still those that sampled the batch (the first minibatch of an update), so the
    ratio's denominator is this forward's own log-prob, detached: rho = 1 exactly, and rounding differences between
    the rollout's and the learner's forwards (bf16 on GPU) cannot clip children; their size is reported as
    `logp_dev` (max |log p_learner - log p_rollout|).
    """
    device = transformer.device
    states, steps = mb["states"].to(device), mb["step_index"].to(device)
    embeds, pooled, neg, neg_pooled = prompts.rows(mb["prompt_index"], device)
    sigma = sigmas.to(device)[steps]  # [n]
    v = predict_velocity(model, states, sigma, embeds, pooled, neg, neg_pooled, cfg["guidance_scale"])
    mean, std_t, std_step = sde_mean_per_item(states, v, sigmas, steps, cfg["noise_level"])  # [n, C, h, w], [n]
    children = mb["children"].to(device)  # [n, m, C, h, w]
    logp = gaussian_log_prob(children, mean.unsqueeze(1), std_step.view(-1, 1, 1, 1, 1))  # [n, m]
    rollout_logp = mb["old_log_probs"].to(device)
    old = logp.detach() if on_policy else rollout_logp
    loss, stats = clipped_policy_loss(logp, old, mb["advantages"].to(device), cfg["clip_eps"])
    stats["logp_dev"] = (logp.detach() - rollout_logp).abs().max()
    per_state = loss.mean(dim=1)  # [n]
    kl = torch.zeros_like(per_state)
    if cfg["beta"] > 0:
        with torch.no_grad(), adapter_disabled(transformer):
            v_ref = predict_velocity(transformer, states, sigma, embeds, pooled, neg, neg_pooled,
                                     cfg["guidance_scale"])
            mean_ref, _, _ = sde_mean_per_item(states, v_ref, sigmas, steps, cfg["noise_level"])
        kl = gaussian_kl(mean, mean_ref, std_t)  # [n]
        per_state = per_state + cfg["beta"] * kl
    stats["kl"] = kl.detach()
    stats["policy_loss"] = loss.detach()
    return per_state, stats


def split_micro_batches(shard: dict, grad_accum: int) -> list[dict]:
    """`grad_accum` micro-batches of a rank's shard (some may be empty when groups were dropped)."""
    n = shard["states"].shape[0]
    bounds = torch.linspace(0, n, grad_accum + 1).round().long().tolist()
    return [{k: v[lo:hi] for k, v in shard.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]


def _cell_backward(engine, transformer, cell: dict, total_states: int, world: int, prompts, sigmas, cfg,
                   on_policy: bool, sums: torch.Tensor, devs: torch.Tensor) -> torch.Tensor:
    """One micro-batch (a cell) of a minibatch: forward, backward, and DeepSpeed's step (which applies the update at
    the accumulation boundary). Adds to `sums` [8] in place; returns the running maxima `devs` [2]."""
    n = cell["advantages"].shape[0]
    if n == 0:  # every rank takes part in every reduction, also with nothing to train
        loss = sum(p.sum() for p in transformer.parameters() if p.requires_grad) * 0.0
    else:
        per_state, st = state_losses(engine, transformer, cell, prompts, sigmas, cfg, on_policy)
        # DeepSpeed divides by accum and averages over ranks: this weighting makes the step the mean over all
        # states of the minibatch, whatever their spread over ranks and micro-batches.
        loss = per_state.sum() * (world * cfg["grad_accum"] / max(total_states, 1))
        sums += torch.tensor([per_state.detach().sum().item(), st["policy_loss"].mean(1).sum().item(),
                              st["kl"].sum().item(), st["ratio"].sum().item(), st["clipped"].sum().item(),
                              st["approx_kl"].sum().item(), st["ratio"].numel(), n], dtype=torch.float64)
        devs = torch.maximum(devs, torch.stack([(st["ratio"] - 1).abs().max(), st["logp_dev"]]).double().cpu())
    engine.backward(loss)
    engine.step()
    return devs


def _reduce(engine, transformer, sums: torch.Tensor, devs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A finished minibatch's sums and maxima over all ranks, and its gradient norm."""
    if dist.is_available() and dist.is_initialized():  # on the device: NCCL reduces only GPU tensors
        sums, devs = sums.to(transformer.device), devs.to(transformer.device)
        dist.all_reduce(sums)
        dist.all_reduce(devs, op=dist.ReduceOp.MAX)
    grad_norm = engine.get_global_grad_norm()
    return sums.cpu(), devs.cpu(), float(grad_norm) if grad_norm is not None else float("nan")


def _zeros() -> tuple[torch.Tensor, torch.Tensor]:
    # sums: loss, policy, kl, ratio, clipped, approx_kl, children, states; devs: max |rho - 1| (0 when on-policy),
    # max |log p learner - log p rollout|
    return torch.zeros(8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)


def _minibatch_step(engine, transformer, cells: list[dict], total_states: int, world: int, prompts, sigmas, cfg,
                    on_policy: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step over this rank's cells of a minibatch (exactly `grad_accum` of them): (sums [8] over ranks,
    [max |rho - 1|, max |log p learner - log p rollout|] over ranks, grad norm)."""
    sums, devs = _zeros()
    for cell in cells:
        devs = _cell_backward(engine, transformer, cell, total_states, world, prompts, sigmas, cfg, on_policy, sums,
                              devs)
    return _reduce(engine, transformer, sums, devs)


def _format(s: list[float], devs: list[float], grad_norm: float) -> dict:
    children, states = max(s[6], 1), max(s[7], 1)
    return {"train/loss": s[0] / states, "train/policy_loss": s[1] / states, "train/kl_ref": s[2] / states,
            "train/ratio_mean": s[3] / children, "train/clip_frac": s[4] / children,
            "train/approx_kl": s[5] / children, "train/states": s[7], "train/ratio_max_dev": devs[0],
            "train/rollout_logp_dev": devs[1], "train/grad_norm": grad_norm}


class IterationStats:
    """Stats of one update over its minibatches: means weighted by states / children, the largest deviations, the
    mean gradient norm and, with several minibatches, `train/mb<j>/{clip_frac, approx_kl, ratio_max_dev}`."""

    def __init__(self, minibatches: int):
        self.several = minibatches > 1
        self.total, self.devs = _zeros()
        self.norms: list[float] = []
        self.per_mb: dict[str, float] = {}

    def add(self, j: int, sums: torch.Tensor, devs: torch.Tensor, norm: float) -> None:
        self.total += sums
        self.devs = torch.maximum(self.devs, devs)
        self.norms.append(norm)
        if self.several:
            part = _format(sums.tolist(), devs.tolist(), norm)
            self.per_mb.update({f"train/mb{j}/{k}": part[f"train/{k}"]
                                for k in ("clip_frac", "approx_kl", "ratio_max_dev")})

    def result(self) -> dict:
        return {**_format(self.total.tolist(), self.devs.tolist(), sum(self.norms) / max(len(self.norms), 1)),
                **self.per_mb}


def train_update(engine, transformer, shard: dict, total_states: int, world: int, prompts, sigmas, cfg) -> dict:
    """One on-policy optimizer step over this rank's shard of `total_states` states (in `grad_accum` near-equal
    micro-batches); returns stats over all ranks."""
    cells = split_micro_batches(shard, cfg["grad_accum"])
    sums, devs, grad_norm = _minibatch_step(engine, transformer, cells, total_states, world, prompts, sigmas, cfg,
                                            on_policy=True)
    return _format(sums.tolist(), devs.tolist(), grad_norm)


def train_iteration(engine, transformer, minibatches: list[list[dict]], totals: list[int], world: int, prompts,
                    sigmas, cfg) -> dict:
    """One optimizer step per minibatch (`grpo.updates_per_iter` of them; this rank's cells of each, as
    `minibatch_shards` deals them).

    The first minibatch runs on the parameters that sampled the batch, so its ratio is 1 exactly (`state_losses`,
    on_policy); later minibatches take the ratio against the rollout's log-probs (Flow-GRPO's old log-probs), so it
    measures how far the earlier steps moved the policy: that is where the clipped objective acts.
    """
    stats = IterationStats(len(minibatches))
    for j, (cells, n) in enumerate(zip(minibatches, totals)):
        stats.add(j, *_minibatch_step(engine, transformer, cells, n, world, prompts, sigmas, cfg, on_policy=j == 0))
    return stats.result()


def load_cell(work: dict, cache: dict) -> dict:
    """A cell from the Coordinator with its states [n, C, h, w] and children [n, m, C, h, w], gathered from the
    rollout latent chunks it names (fetched from the object store once per update: `cache`, first state -> chunk)."""
    import ray

    cell = work["cell"]
    if not cell["advantages"].shape[0]:
        return cell
    todo = [src for src in work["sources"] if src[0] not in cache]
    for (start, n, ref), value in zip(todo, ray.get([src[2][0] for src in todo])):
        cache[start] = (start, n, value)
    states, children = gather_states(cell["state_index"], [cache[src[0]] for src in work["sources"]])
    return {**cell, "states": states, "children": children}


def learner_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: serve updates from the Coordinator until it says stop."""
    import ray

    rank, world, _, comps = train_worker_setup(config)
    transformer = comps.transformer
    lora = config["lora"]
    params = add_lora(transformer, lora["rank"], lora["alpha"], tuple(lora["target_modules"]))
    sigmas = schedule_sigmas(comps.scheduler, config["num_steps"])
    ds = deepspeed_config(config["micro_batch_states"], config["grad_accum"], world, config["zero_stage"],
                          config["bf16"], config["max_grad_norm"])
    engine, _ = init_engine(transformer, params, config["lr"], config["weight_decay"], ds)
    version = config["start_version"]
    state_dir = config.get("state_dir")
    if state_dir and (Path(state_dir) / "latest").is_file():
        # Ray Train restarted this worker group after a failure: continue from the last acknowledged update
        _, client_state = engine.load_checkpoint(state_dir, load_module_strict=False)
        version = client_state["version"]
    elif config.get("resume_dir"):
        engine.load_checkpoint(config["resume_dir"], tag=DS_TAG, load_module_strict=False)
    prompts = config["prompts"]  # PromptTable (an object-store value, resolved once here)
    if isinstance(prompts, ray.ObjectRef):
        prompts = ray.get(prompts)
    coordinator = ray.get_actor(config["coordinator"], namespace=config["namespace"])
    ray.get(coordinator.register.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id()))
    publish_dtype = torch_dtype(config["publish_dtype"])
    if rank == 0:
        state = lora_state(transformer, publish_dtype)
        ray.get(coordinator.started.remote(version, [ray.put(state)], {"lora/norm": lora_norm(state)}))
    # started() gives the coordinator fresh queues for this generation: no rank may wait for work before that, or it
    # waits on a queue nothing is sent to any more (with 2 learner workers, the first update hung without this)
    dist.barrier()
    last_save_s = 0.0  # seconds the last learner-state save took, reported with the next update (0: none yet)
    stats = None  # the update in progress: its stats, latent chunks, busy seconds, first cell's start
    while True:
        work = ray.get(coordinator.next_work.remote(rank))
        if work is None:
            return
        if work["version"] != version:  # a duplicate of an update this group already applied
            continue
        start = time.perf_counter()
        if stats is None:
            stats, chunks, busy, first = IterationStats(work["minibatches"]), {}, 0.0, start
        if work["rows"] != config["grad_accum"]:
            raise RuntimeError(f"a minibatch of {work['rows']} rows for grad_accum = {config['grad_accum']}")
        j, row = work["minibatch"], work["row"]
        if row == 0:
            sums, devs = _zeros()
        devs = _cell_backward(engine, transformer, load_cell(work, chunks), work["total"], world, prompts, sigmas,
                              config, j == 0, sums, devs)
        if row == work["rows"] - 1:
            stats.add(j, *_reduce(engine, transformer, sums, devs))
        busy += time.perf_counter() - start
        if j < work["minibatches"] - 1 or row < work["rows"] - 1:
            continue
        # the update's last cell: every optimizer step is taken
        result, stats = stats.result(), None
        if work.get("checkpoint_dir"):
            # every rank: optimizer shards; the frozen base weights are rebuilt from the preset, never saved
            engine.save_checkpoint(work["checkpoint_dir"], tag=DS_TAG, exclude_frozen_parameters=True)
        version = work["version"] + 1
        if rank == 0:
            state = lora_state(transformer, publish_dtype)
            # learner_compute: seconds this rank worked on the update (its busy time); learner_span: from its first
            # cell to now (in the pipelined schedule it includes waiting for groups to be scored)
            result.update({"lora/norm": lora_norm(state), "timing/learner_compute": busy,
                           "timing/learner_span": time.perf_counter() - first,
                           "timing/learner_state_save": last_save_s})
            # owned by this process: a restart of the worker group loses it, and the driver asks for it again (sync)
            ray.get(coordinator.publish.remote(version, [ray.put(state)], result))
        if state_dir and version % config["state_every"] == 0:
            # after publishing: the driver keeps the updates since the last save and replays them after a restart
            t0 = time.perf_counter()
            save_learner_state(engine, state_dir, rank, version)
            last_save_s = time.perf_counter() - t0


def save_learner_state(engine, state_dir: str, rank: int, version: int, keep: int = 2) -> None:
    """The learner's state (LoRA + optimizer, every rank's shard) after every `state_every`-th update.

    A restarted worker group (Ray Train's FailureConfig) loads the newest one and reports its version; the driver
    re-sends the updates since then (it keeps them until a newer state is surely saved). This is our
    own directory rather than `ray.train.report` checkpoints: Ray Train V2 registers a reported checkpoint only at
    its next health-check poll (2 s), so a failure right after an update would restore an older one. `latest` (the
    tag DeepSpeed's load_checkpoint reads) is written here, atomically, once save_checkpoint has returned on every
    rank: DeepSpeed 0.19.8's own `latest` is written by rank 0 before the final barrier, while other ranks may still be
    writing their shards. Frozen base weights are left out (LoRA + optimizer only).
    """
    tag = f"v{version:06d}"
    engine.save_checkpoint(state_dir, tag=tag, client_state={"version": version}, save_latest=False,
                           exclude_frozen_parameters=True)  # LoRA + optimizer only: 1.6 MB vs 19.5 MB on `small`
    if rank == 0:  # save_checkpoint ends with a barrier: every rank's shard of `tag` is complete
        import shutil

        tmp = Path(state_dir) / ".latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(state_dir) / "latest")
        for old in sorted(Path(state_dir).glob("v*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
