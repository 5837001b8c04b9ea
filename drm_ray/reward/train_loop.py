"""The DRM training loop run by each Ray Train worker: Bradley-Terry on noised preference pairs, DeepSpeed ZeRO-2.

Per pair one noise level s (the shifted distribution, s = 0 with 10% probability), winner and loser noised
independently at that s, loss -log sigmoid(r_w - r_l) (with a soft label p < 1, the cross-entropy of sigmoid(r_w - r_l)
with p: `bradley_terry_loss`); ties are dropped. Each rank streams its own share of the
embedding cache's row groups.

Sized for SD3.5-Medium (one optimizer step = `batch_size` pairs = 2 x batch_size sequences of 1024 image + 333 text
tokens through 21 blocks of width 1536):
- each rank reads its `micro x accum` pairs of a step at once (CPU), draws their noise with one generator keyed by
  (seed, rank, step), and runs them as `accum` micro-steps of `micro` pairs; DeepSpeed accumulates the gradients, and
  each micro-step's loss is weighted so that the step is the mean over all `batch_size` pairs. Data and noise of a
  step do not depend on `micro`, so changing the split changes only floating-point summation order;
- `gradient_checkpointing` recomputes each kept block in the backward pass (see `backward_saved_bytes` in model.py);
- the source transformer is built on the CPU; only the DRM's modules (embedders, kept blocks, head) go to the device,
  and the worker keeps no reference to the source (its dropped blocks and output layers are freed).

Validation (`val_every` > 0): the first `val_pairs` non-tie pairs of the held-out cache, split over ranks (rank r
takes pairs r, r + world, ...), scored at each t of `val_timesteps` with noise keyed by (seed, t, pair index)
(`evaluate.heldout_noise`), so every validation sees the same noisy inputs whatever the number of ranks; correct /
total counts are all-reduced (every rank gets the numbers).
Validation also runs at the last step. Rank 0 keeps the best DRM (by the mean accuracy over t; the earliest on ties)
and puts it into every checkpoint as `drm_best/`, next to the current `drm/`.

Metrics are all-reduced every `log_every` steps and rank 0 sends them to the driver through a Ray queue (MLflow lives
on the driver only). Checkpoints go through `ray.train.report`: the DeepSpeed state of every rank, plus the DRM
directories and the step from rank 0; a restarted or resubmitted run resumes from the latest one.

Departure from a fully deterministic resume: the data order after a resume is reshuffled with a seed that includes
the resume step (the noise draws are keyed by step and stay exact).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from drm_ray.algorithms.losses import accuracy_by_noise_bucket, bradley_terry_loss
from drm_ray.data.cache import PairBatch, iter_pairs
from drm_ray.diffusion.flow import sample_noise_levels
from drm_ray.reward.evaluate import heldout_noise
from drm_ray.reward.model import DiffusionRewardModel, build_drm, score_noised_pairs
from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine

STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator per (seed, rank, step), hashed so that no two of them share a seed (a linear mix such as
    seed * a + rank * b + step repeats once steps exceed b)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def build_training_drm(preset: str, model_kwargs: dict, device, *, n_drop: int, head: str, head_dim: int, init: str,
                       latent_size: int, seed: int, gradient_checkpointing: bool = False) -> DiffusionRewardModel:
    """The DRM on `device`, built from a source transformer loaded on the CPU and dropped on return."""
    from drm_ray.models.sd3 import build_components

    source = build_components(preset, text=False, vae=False, device="cpu", **model_kwargs).transformer
    model = build_drm(source, n_drop=n_drop, head=head, head_dim=head_dim, init=init, latent_size=latent_size,
                      seed=seed)
    del source  # the dropped blocks, norm_out and proj_out are freed here and never reach the device
    model.gradient_checkpointing = gradient_checkpointing
    return model.to(device)


def draw_pair_noise(n: int, latent_shape, generator: torch.Generator, zero_prob: float, shift: float,
                    shared: bool = False):
    """One noise level per pair and noise for winner and loser, independent or (`shared`) one draw for both:
    -> s [n], eps [2, n, C, h, w]."""
    s = sample_noise_levels(n, generator, zero_prob=zero_prob, shift=shift)  # [n]
    if shared:
        return s, torch.randn((1, n, *latent_shape), generator=generator).expand(2, -1, -1, -1, -1)
    eps = torch.randn((2, n, *latent_shape), generator=generator)  # [2, n, C, h, w]
    return s, eps


def micro_step_loss(model, batch: PairBatch, s, eps, pairs_per_step: int, world: int, accum: int):
    """The loss one micro-step backpropagates, and its rewards r_w, r_l [b].

    DeepSpeed divides each backward by `accum` and averages gradients over ranks; weighting the micro-batch's summed
    Bradley-Terry loss by world * accum / pairs_per_step makes the optimizer step the mean over all its pairs.
    """
    r_w, r_l = score_noised_pairs(model, batch, s, eps)
    mean_loss, _ = bradley_terry_loss(r_w, r_l, batch.label)  # ties are dropped; a label < 1 is a soft preference
    return mean_loss * (len(batch) * world * accum / pairs_per_step), r_w, r_l


def train_step(engine, batch: PairBatch, s, eps, micro: int, accum: int, world: int, pairs_per_step: int, device):
    """One optimizer step over this rank's `micro * accum` pairs (CPU): -> summed BT loss, r_w, r_l [micro * accum]."""
    loss_sum, rewards = 0.0, []
    for i in range(accum):
        part = slice(i * micro, (i + 1) * micro)
        mb = _rows(batch, part).to(device)
        loss, r_w, r_l = micro_step_loss(engine, mb, s[part], eps[:, part], pairs_per_step, world, accum)
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        loss_sum += loss.item() * pairs_per_step / (world * accum)
        rewards.append((r_w.detach().cpu(), r_l.detach().cpu()))
    return loss_sum, torch.cat([r[0] for r in rewards]), torch.cat([r[1] for r in rewards])


def _rows(b: PairBatch, part: slice) -> PairBatch:
    return PairBatch(b.latent_win[part], b.latent_lose[part], b.prompt_embeds[part], b.pooled[part], b.label[part],
                     b.prompt[part])


# ---------------------------------------------------------------------------------------------------- validation

def load_validation_pairs(cache_dir, n: int, rank: int = 0, world: int = 1) -> tuple[PairBatch, torch.Tensor]:
    """This rank's share of the first `n` non-tie pairs of a held-out cache, in file order (the same pairs at every
    validation), and their row positions in the cache, which key their noise exactly as jobs/eval_drm.py keys it
    (so validation and evaluation score the same noisy inputs). Rows are dealt by position (rank r takes positions
    = r mod world). Read in small batches and kept with float16 text embeddings, as stored: 512 pairs at SD3.5 size
    would be 2.8 GB in float32 on every rank."""
    parts, index, kept, row = [], [], 0, 0
    for b in iter_pairs(cache_dir, 32):
        position = torch.arange(row, row + len(b))  # [b] row positions in the cache, ties included
        row += len(b)
        strict = (b.label > 0.5).nonzero().flatten()[: n - kept]
        kept += len(strict)
        sel = strict[position[strict] % world == rank]
        parts.append(PairBatch(b.latent_win[sel], b.latent_lose[sel], b.prompt_embeds[sel].half(),
                               b.pooled[sel].half(), b.label[sel], [b.prompt[i] for i in sel.tolist()]))
        index.append(position[sel])
        if kept >= n:
            break
    if kept == 0:
        raise ValueError(f"data.heldout_data = {cache_dir}: no non-tie pairs to validate on")
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    mine = PairBatch(cat("latent_win"), cat("latent_lose"), cat("prompt_embeds"), cat("pooled"), cat("label"),
                     [q for p in parts for q in p.prompt])
    return mine, torch.cat(index)


@torch.no_grad()
def validate(model, pairs: PairBatch, index: torch.Tensor, timesteps, seed: int, world: int,
             batch_size: int) -> dict:
    """Held-out accuracy at each t on this rank's `pairs` (their indices `index` key the noise), counts summed
    over ranks."""
    device = model.device
    counts = torch.zeros(len(timesteps), 2, dtype=torch.float64)  # [T, (correct, total)]
    was_training = model.training
    model.eval()
    for ti, t in enumerate(timesteps):
        for chunk in torch.arange(len(pairs)).split(batch_size):
            mb = PairBatch(pairs.latent_win[chunk], pairs.latent_lose[chunk], pairs.prompt_embeds[chunk],
                           pairs.pooled[chunk], pairs.label[chunk], [pairs.prompt[j] for j in chunk.tolist()])
            eps = heldout_noise(seed, t, index[chunk], pairs.latent_win.shape[1:])  # [2, b, C, h, w]
            r_w, r_l = score_noised_pairs(model, mb.to(device), torch.full((len(chunk),), t / 1000.0), eps)
            counts[ti, 0] += (r_w > r_l).sum().item()
            counts[ti, 1] += len(chunk)
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
    counts = counts.cpu()
    acc = {f"val/accuracy_t{t}": (counts[i, 0] / counts[i, 1].clamp(min=1)).item() for i, t in enumerate(timesteps)}
    acc["val/accuracy_mean"] = sum(acc.values()) / len(timesteps)
    return acc


def set_trainable(model, train_blocks: int | None) -> None:
    """Every weight learns (None), or only the last `train_blocks` kept blocks and the reward head."""
    model.requires_grad_(train_blocks is None)
    if train_blocks is not None:
        model.head.requires_grad_(True)
        for block in list(model.blocks)[len(model.blocks) - train_blocks:]:
            block.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------- the loop

def drm_train_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; `config` holds plain values (see drm_ray.reward.trainer.train_drm)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    model = build_training_drm(config["preset"], config["model_kwargs"], device, n_drop=config["n_drop"],
                               head=config["head"], head_dim=config["head_dim"], init=config["init"],
                               latent_size=config["latent_size"], seed=config["seed"],
                               gradient_checkpointing=config["gradient_checkpointing"])
    set_trainable(model, config.get("train_blocks"))
    model.train()
    micro, accum, pairs_per_step = config["micro"], config["accum"], config["batch_size"]
    ds_cfg = deepspeed_config(micro, accum, world, config["zero_stage"], config["bf16"], config["max_grad_norm"])
    engine, _ = init_engine(model, model.parameters(), config["lr"], 0.0, ds_cfg)

    best = _Best(rank)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            start = state["step"]
            best.restore(Path(d), state)
    val_pairs = None
    if config["val_every"]:
        val_pairs, val_index = load_validation_pairs(config["heldout_dir"], config["val_pairs"], rank, world)
    pairs = iter_pairs(config["cache_dir"], micro * accum, rank=rank, world_size=world, drop_ties=True,
                       seed=config["seed"] + start, loop=True)
    try:
        window = _Window()
        for step in range(start, config["train_steps"]):
            batch = next(pairs)
            generator = step_generator(config["seed"], rank, step)
            s, eps = draw_pair_noise(len(batch), batch.latent_win.shape[1:], generator, config["zero_noise_prob"],
                                     config["shift"], config.get("pair_noise") == "shared")
            loss_sum, r_w, r_l = train_step(engine, batch, s, eps, micro, accum, world, pairs_per_step, device)
            window.add(loss_sum, r_w, r_l, s)
            done, last = step + 1, step + 1 == config["train_steps"]
            queue = config.get("metrics_queue") if rank == 0 else None
            if done % config["log_every"] == 0 or last:
                metrics = window.reduce(device)
                metrics.update({"train/lr": config["lr"], "step": done})
                if queue is not None:
                    queue.put(metrics)
                window = _Window()
            if val_pairs is not None and (done % config["val_every"] == 0 or last):
                metrics = validate(model, val_pairs, val_index, config["val_timesteps"], config["seed"], world, micro)
                best.update(model, metrics["val/accuracy_mean"], done)
                if queue is not None:
                    queue.put({**metrics, "val/best_step": best.step, "step": done})
            if done % config["checkpoint_every"] == 0 or last:
                _report_checkpoint(engine, model, rank, done, best)
    finally:
        best.close()  # rank 0's local copy of the best DRM (GBs at SD3.5 scale)


class _Best:
    """Rank 0's best DRM so far (by mean validation accuracy), kept in a local directory between checkpoints."""

    def __init__(self, rank: int):
        self.rank, self.score, self.step = rank, float("-inf"), 0
        self.dir = Path(tempfile.mkdtemp(prefix="drm_best_")) / "drm" if rank == 0 else None

    def update(self, model, score: float, step: int) -> None:
        if score > self.score:
            self.score, self.step = score, step
            if self.rank == 0:
                model.save_pretrained(self.dir)

    def restore(self, checkpoint_dir: Path, state: dict) -> None:
        if state.get("best_step"):
            self.score, self.step = state["best_score"], state["best_step"]
            if self.rank == 0:
                shutil.copytree(checkpoint_dir / "drm_best", self.dir, dirs_exist_ok=True)

    def state(self) -> dict:
        return {"best_step": self.step, "best_score": self.score if self.step else None}

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir.parent, ignore_errors=True)


class _Window:
    """Loss, accuracy and per-noise-bucket accuracy since the last log line, summed over ranks on reduce."""

    def __init__(self):
        self.loss_sum, self.pairs, self.correct, self.t0 = 0.0, 0, 0.0, time.perf_counter()
        self.buckets: dict[str, list[float]] = {}

    def add(self, loss_sum: float, r_w, r_l, s) -> None:
        self.loss_sum += loss_sum
        self.pairs += len(s)
        self.correct += (r_w > r_l).float().sum().item()
        for name, (c, n) in accuracy_by_noise_bucket(r_w, r_l, s).items():
            acc = self.buckets.setdefault(name, [0.0, 0.0])
            acc[0] += c
            acc[1] += n

    def reduce(self, device) -> dict:
        names = sorted(self.buckets)
        vec = torch.tensor([self.loss_sum, self.pairs, self.correct] + [v for n in names for v in self.buckets[n]],
                           dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
        vec = vec.cpu().tolist()
        elapsed = time.perf_counter() - self.t0
        out = {"train/loss": vec[0] / max(vec[1], 1), "train/accuracy": vec[2] / max(vec[1], 1),
               "train/pairs_per_s": vec[1] / max(elapsed, 1e-9)}
        for i, name in enumerate(names):
            correct, count = vec[3 + 2 * i], vec[4 + 2 * i]
            if count:
                out[f"train/accuracy_{name}"] = correct / count
        return out


def _report_checkpoint(engine, model, rank: int, step: int, best: _Best) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)  # every rank writes its optimizer shard
        if rank == 0:
            model.save_pretrained(Path(d) / "drm")
            if best.step:
                shutil.copytree(best.dir, Path(d) / "drm_best")
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": step, **best.state()}))
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))
