"""Wiring of the RL job's actors: prompt table, reward scorers, rollout workers, the learner, the evaluation panel.

Ray at the edges: the worker classes are plain Python; this is where they become actors with the resources the
config asks for (`num_gpus=1` per actor on GPU presets, fractional CPUs on the tiny preset). The torch device of
each actor is chosen from `torch.cuda.is_available()` inside it, never from Ray's GPU ids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray
import torch

from drm_ray.algorithms.rl_batch import IterationLayout, grad_accum
from drm_ray.data.prompt_table import prompt_table_ref, release_table, share_table
from drm_ray.data.prompts import load_prompts
from drm_ray.diffusion.sampling import decode_latents
from drm_ray.models.lora import save_lora_diffusers
from drm_ray.models.sd3 import latent_size, load_vae, model_kwargs
from drm_ray.placement import ensure_resources, learner_worker_resources, role_demands, rollout_actor_options
from drm_ray.reward.specs import IMAGE_KINDS, parse_spec
from drm_ray.workers.learner_group import LearnerGroup
from drm_ray.workers.rollout import RolloutWorker
from drm_ray.workers.scorer import RewardScorer, scorer_kwargs


class RLSetup:
    def __init__(self, cfg, out: Path, prompts: list[str], resume_dir: Path | None, start_version: int):
        self.cfg, self.out = cfg, out
        m, s, ro, le = cfg.model, cfg.sampling, cfg.rollout, cfg.learner
        self.kwargs = model_kwargs(m, s)
        self.branch_steps = cfg.branch_steps()
        self.lora_cfg = cfg.lora_spec()
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

        ensure_resources(role_demands(cfg), ro.autoscale_wait_s)  # before the first GPU task or actor
        # held-out evaluation prompts (data.eval_prompts) follow the training prompts in one table; training draws
        # from the first len(prompts) rows only
        held_out = load_prompts(cfg.data.eval_prompts, m.preset) if cfg.data.eval_prompts else []
        # the prompt table stays in the object store (float16 numpy, zero-copy per node); actors get the reference
        self.prompts_ref = prompt_table_ref(list(prompts) + held_out, s.negative_prompt, m.preset, self.kwargs,
                                            on_gpu=bool(ro.num_gpus))
        self.table = table = share_table(self.prompts_ref)  # restartable actors take the holder's name
        self.rewards = [parse_spec(r) for r in cfg.reward.rewards]  # what is optimized, with weights
        judges = [parse_spec(j) for j in cfg.reward.judges]  # what only evaluates
        self.judges = [j.name for j in judges]
        # the run's own DRM (trained first on a CPU preset when reward.drm_path is unset) unless each names its own
        uses_drm = any(r.kind == "drm" and r.source is None for r in self.rewards + judges)
        drm_path = resolve_drm(cfg, out) if uses_drm else None
        # image rewards score a branching child through its denoised estimate x0_hat (a policy forward per child)
        self.x0_children = cfg.grpo.algo == "step_grpo" and any(r.kind in IMAGE_KINDS for r in self.rewards)
        actor = rollout_actor_options(ro)  # resources from the config, SPREAD over nodes
        actor["max_restarts"] = ro.max_restarts  # a dead actor comes back; the driver resubmits its work
        dtype = m.dtype if ro.num_gpus else None
        names = [f"{table}_scorer{i}" for i in range(ro.num_scorers)]  # workers find their scorer by name
        self.scorers = [ray.remote(RewardScorer).options(**actor, name=names[i]).remote(
            prompts=table, torch_threads=threads,
            **scorer_kwargs(cfg, cfg.reward.rewards, drm_path, dtype))
            for i in range(ro.num_scorers)]
        self.judge = None
        if self.judges:  # one actor, off the training path: it scores the evaluation panel only
            self.judge = ray.remote(RewardScorer).options(**actor).remote(
                prompts=table, torch_threads=threads, **scorer_kwargs(cfg, cfg.reward.judges, drm_path, dtype))
        sampling = cfg.rollout_sampling()
        self.workers = [ray.remote(RolloutWorker).options(**actor).remote(
            m.preset, self.kwargs, self.lora_cfg, table, sampling, cfg.grpo.algo, threads,
            names[i % len(names)], self.x0_children, ro.timeout_s) for i in range(ro.num_workers)]
        self.per_group = len(self.branch_steps) * (1 if cfg.grpo.algo == "step_grpo" else s.k)  # trained states
        states = cfg.grpo.prompts_per_iter * self.per_group
        loop_config = dict(
            **update_config(cfg, states, le.num_workers, self.per_group),
            preset=m.preset, model_kwargs=self.kwargs, lora=self.lora_cfg, num_steps=s.num_steps,
            micro_batch_states=le.micro_batch_states, updates_per_iter=cfg.grpo.updates_per_iter,
            zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16, max_grad_norm=le.max_grad_norm,
            lr=le.lr, weight_decay=le.weight_decay, start_version=start_version,
            resume_dir=str(resume_dir) if resume_dir else None, prompts=self.prompts_ref,
            publish_dtype=le.publish_dtype, torch_threads=threads)
        self.grad_accum = loop_config["grad_accum"]
        resources = learner_worker_resources(le)  # Ray Train packs its workers (ScalingConfig's default PACK)
        self.learner = LearnerGroup(loop_config, le.num_workers, le.use_gpu, str(out / "ray_train"), ro.timeout_s,
                                    max_failures=le.max_failures, resources_per_worker=resources,
                                    state_every=le.state_every)
        # the learner starts (Ray Train's controller and workers, model builds) while the actors load theirs
        try:
            ray.get([a.ready.remote() for a in self.scorers + self.workers + self.judge_actors()],
                    timeout=ro.timeout_s)
            policy_cfg = ray.get(self.workers[0].transformer_config.remote(), timeout=ro.timeout_s)
            ray.get([a.check_compatible.remote(policy_cfg, latent_size(m.preset, s.resolution))
                     for a in self.scorers[:1] + self.judge_actors()], timeout=ro.timeout_s)  # a DRM judge too
            self.sigmas = ray.get(self.workers[0].schedule.remote(), timeout=ro.timeout_s)
        except BaseException:
            self.shutdown()  # a DRM that does not fit the policy, an actor that cannot start: stop everything
            raise

        n_eval = cfg.grpo.eval_panel_size
        # the panel cycles through the held-out prompts when there are any, else through the training prompts
        first, count = (len(prompts), len(held_out)) if held_out else (0, len(prompts))
        self.eval_prompts = [first + j % count for j in range(n_eval)]
        self.eval_texts = [(list(prompts) + held_out)[i] for i in self.eval_prompts]
        self.eval_seeds = [cfg.run.seed + 10_000 + j for j in range(n_eval)]
        self.vae = load_vae(m.preset, m.path, s.resolution, m.seed)  # decodes the image panel on the driver

    def layout(self, groups: int) -> IterationLayout:
        """How an iteration of `groups` prompt groups is dealt to the learner (minibatches, rows, ranks)."""
        return IterationLayout(groups, self.per_group, self.cfg.grpo.updates_per_iter,
                               self.cfg.learner.num_workers, self.grad_accum)

    def judge_actors(self) -> list:
        return [self.judge] if self.judge is not None else []

    def eval_panel(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """ODE samples of the evaluation panel: ({reward or judge name: each image's score [N]}, the images
        [N, 3, H, W] in [0, 1]), in the panel's fixed order (the same prompts and seeds every time, so two panels
        compare image by image). The optimized rewards are keyed by their name (the kind, or kind-<source> for a
        spec with its own model), the judges by `judge/<name>`."""
        ro = self.cfg.rollout
        latents = ray.get(self.workers[0].sample_panel.remote(self.eval_prompts, self.eval_seeds,
                                                              self.cfg.sampling.eval_num_steps), timeout=ro.timeout_s)
        args = (latents, torch.zeros(len(latents)), torch.tensor(self.eval_prompts))
        refs = [self.scorers[0].score_all.remote(*args)] + [j.score_all.remote(*args) for j in self.judge_actors()]
        scores = ray.get(refs, timeout=ro.timeout_s)
        columns = {r.name: scores[0][:, i].float() for i, r in enumerate(self.rewards)}
        if self.judge is not None:
            columns.update({f"judge/{name}": scores[1][:, i].float() for i, name in enumerate(self.judges)})
        return columns, decode_latents(self.vae, latents)

    def save_lora(self, state: dict, directory: Path) -> Path:
        return save_lora_diffusers(state, directory, self.cfg.lora.rank, self.cfg.lora.alpha,
                                   tuple(self.cfg.lora.target_modules))

    def shutdown(self) -> None:
        self.learner.shutdown()
        for a in self.workers + self.scorers + self.judge_actors():
            ray.kill(a)
        release_table(self.table)


def resolve_drm(cfg, out: Path) -> Path:
    """reward.drm_path, else `<output_dir>/drm` from an earlier run, else (tiny only) train one now and say so."""
    if cfg.reward.drm_path:
        return Path(cfg.reward.drm_path)
    local = out / "drm"
    if (local / "drm_config.json").is_file():
        print(f"[step_grpo] using the DRM in {local}", flush=True)
        return local
    if cfg.model.preset == "toy":
        raise ValueError("reward.drm_path is required for the toy preset: make oracle-labelled pairs with "
                         "jobs/toy_pairs.py, then train one with jobs/train_drm.py --config toy --pairs "
                         "outputs/toy/pairs/train.parquet")
    if cfg.model.preset != "tiny":
        raise ValueError("reward.drm_path is required for this preset: train one with jobs/train_drm.py")
    print(f"[step_grpo] no reward.drm_path given: training a tiny DRM on the synthetic preference set "
          f"({cfg.drm.train_steps} steps) into {local}", flush=True)
    from drm_ray.data.preprocess import encoder_options, ensure_synthetic_cache
    from drm_ray.reward.trainer import train_drm

    cache = ensure_synthetic_cache(out / "synthetic" / "train", n=1024, seed=cfg.run.seed, preset=cfg.model.preset,
                                   model_kwargs=model_kwargs(cfg.model, cfg.sampling),
                                   **encoder_options(cfg.data, cfg.rollout.autoscale_wait_s))
    return train_drm(cfg, cache)


def image_grid(images, columns: int | None = None):
    """PIL images in a grid: `columns` wide, or about square (at least 4 wide)."""
    from PIL import Image

    columns = columns or max(4, math.ceil(math.sqrt(len(images))))
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (w * columns, h * rows))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def grid_tiles(grid, count: int, size: int, columns: int | None = None):
    """The `count` tiles of `size` x `size` pixels an `image_grid` of `count` images holds, as an array
    [count, size, size, C] (the inverse of `image_grid`, e.g. for a panel read back from MLflow)."""
    import numpy as np

    columns = columns or max(4, math.ceil(math.sqrt(count)))
    arr = np.asarray(grid)
    return np.stack([arr[size * (i // columns):size * (i // columns + 1), size * (i % columns):size * (i % columns + 1)]
                     for i in range(count)])


def update_config(cfg, states: int, num_workers: int = 1, per_group: int = 1) -> dict:
    """What the learner's update step (`train_update` / `train_iteration`) reads, for `states` trained states per
    iteration (groups of `per_group`) over `num_workers` ranks: the learner loop and every bench script take it
    from here."""
    s, g, le = cfg.sampling, cfg.grpo, cfg.learner
    return dict(grad_accum=grad_accum(states, g.updates_per_iter, num_workers, le.micro_batch_states, per_group),
                guidance_scale=s.guidance_scale, noise_level=s.noise_level, clip_eps=g.clip_eps, beta=g.beta)
