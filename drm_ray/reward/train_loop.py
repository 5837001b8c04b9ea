"""The DRM training loop run by each Ray Train worker: Bradley-Terry on noised preference pairs, DeepSpeed ZeRO-2.

Per pair one noise level s (the shifted distribution, s = 0 with 10% probability), winner and loser noised
independently at that s, loss -log sigmoid(r_w - r_l); ties are dropped. Each rank streams its own share of the
embedding cache's row groups. Metrics are all-reduced every `log_every` steps and rank 0 sends them to the driver
through a Ray queue (MLflow lives on the driver only). Checkpoints go through `ray.train.report`: the DeepSpeed state
of every rank, plus the DRM directory and the step from rank 0; a restarted or resubmitted run resumes from the
latest one.

Departure from a fully deterministic resume: the data order after a resume is reshuffled with a seed that includes
the resume step (the noise draws are keyed by step and stay exact).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from drm_ray.algorithms.losses import accuracy_by_noise_bucket, bradley_terry_loss
from drm_ray.data.cache import iter_pairs
from drm_ray.diffusion.flow import add_noise, sample_noise_levels
from drm_ray.reward.model import build_drm
from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine, train_worker_setup

STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


def noised_pair_rewards(model, batch, generator: torch.Generator, zero_prob: float, shift: float):
    """Score winner and loser noised at one shared s per pair (independent noise): -> r_w, r_l, s, all [B]."""
    n = len(batch)
    s = sample_noise_levels(n, generator, zero_prob=zero_prob, shift=shift)  # [B]
    eps = torch.randn((2, *batch.latent_win.shape), generator=generator)  # [2, B, C, h, w]
    device = batch.latent_win.device
    x_w = add_noise(batch.latent_win, eps[0].to(device), s.to(device))
    x_l = add_noise(batch.latent_lose, eps[1].to(device), s.to(device))
    s2 = torch.cat([s, s]).to(device)
    rewards = model(torch.cat([x_w, x_l]), s2, batch.prompt_embeds.repeat(2, 1, 1), batch.pooled.repeat(2, 1))
    r_w, r_l = rewards.chunk(2)
    return r_w, r_l, s


def drm_train_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; `config` holds plain values (see drm_ray.reward.trainer.train_drm)."""
    import ray.train

    rank, world, device, comps = train_worker_setup(config)
    model = build_drm(comps.transformer, n_drop=config["n_drop"], head=config["head"], head_dim=config["head_dim"],
                      init=config["init"], latent_size=config["latent_size"], seed=config["seed"])
    model.requires_grad_(True).train()
    micro = max(1, config["batch_size"] // world)
    ds_cfg = deepspeed_config(micro, 1, world, config["zero_stage"], config["bf16"], config["max_grad_norm"])
    engine, _ = init_engine(model, model.parameters(), config["lr"], 0.0, ds_cfg)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            start = json.loads((Path(d) / STATE_FILE).read_text())["step"]
    pairs = iter_pairs(config["cache_dir"], micro, rank=rank, world_size=world, drop_ties=True,
                       seed=config["seed"] + start, loop=True)
    window = _Window()
    for step in range(start, config["train_steps"]):
        batch = next(pairs).to(device)
        r_w, r_l, s = noised_pair_rewards(engine, batch, step_generator(config["seed"], rank, step),
                                          config["zero_noise_prob"], config["shift"])
        loss, _ = bradley_terry_loss(r_w, r_l)
        engine.backward(loss)
        engine.step()
        window.add(loss.item(), r_w.detach().cpu(), r_l.detach().cpu(), s)
        last = step + 1 == config["train_steps"]
        if (step + 1) % config["log_every"] == 0 or last:
            metrics = window.reduce(device)
            metrics.update({"train/lr": config["lr"], "step": step + 1})
            if rank == 0 and config.get("metrics_queue") is not None:
                config["metrics_queue"].put(metrics)
            window = _Window()
        if (step + 1) % config["checkpoint_every"] == 0 or last:
            _report_checkpoint(engine, model, rank, step + 1)


class _Window:
    """Loss, accuracy and per-noise-bucket accuracy since the last log line, summed over ranks on reduce."""

    def __init__(self):
        self.loss_sum, self.pairs, self.correct, self.t0 = 0.0, 0, 0.0, time.perf_counter()
        self.buckets: dict[str, list[float]] = {}

    def add(self, loss: float, r_w, r_l, s) -> None:
        self.loss_sum += loss * len(s)
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


def _report_checkpoint(engine, model, rank: int, step: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)  # every rank writes its optimizer shard
        if rank == 0:
            model.save_pretrained(Path(d) / "drm")
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": step}))
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))
