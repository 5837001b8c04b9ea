"""The rules a Config must satisfy beyond its field types, checked all at once by `Config.validate()`."""

from __future__ import annotations

import re
from typing import Any


def rule_errors(c, rl: bool) -> list[str]:
    """Every broken rule of `c` (a Config), one line each naming field, value and rule; `rl` adds policy-gradient
    training's rules."""
    e: list[str] = []

    def need(ok: bool, name: str, rule: str, value: Any) -> None:
        if not ok:
            e.append(f"{name} = {value!r}: {rule}")

    m, s, g = c.model, c.sampling, c.grpo
    need(m.preset in ("tiny", "toy", "sd35m"), "model.preset", "must be one of tiny, toy, sd35m", m.preset)
    need(m.preset != "sd35m" or bool(m.path), "model.path", "is required for the sd35m preset "
         "(a local diffusers directory or a hub id)", m.path)
    need(m.preset != "toy" or bool(m.path), "model.path", "is required for the toy preset (the directory "
         "jobs/pretrain_toy.py writes)", m.path)
    need(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "must be float32, bfloat16 or float16", m.dtype)
    need(m.num_attention_heads > 0, "model.num_attention_heads", "must be > 0", m.num_attention_heads)
    need(m.attention_head_dim > 0, "model.attention_head_dim", "must be > 0", m.attention_head_dim)
    need(m.max_sequence_length > 0, "model.max_sequence_length", "must be > 0", m.max_sequence_length)
    need(c.lora.rank > 0, "lora.rank", "must be > 0", c.lora.rank)
    need(c.lora.alpha > 0, "lora.alpha", "must be > 0", c.lora.alpha)
    need(len(c.lora.target_modules) > 0, "lora.target_modules", "must name at least one module", c.lora.target_modules)
    factor = 8 if m.preset == "toy" else 16
    need(s.resolution > 0 and s.resolution % factor == 0, "sampling.resolution", f"must be a positive multiple of "
         f"{factor} (VAE factor {factor // 2} times patch size 2)", s.resolution)
    need(s.num_steps >= 2, "sampling.num_steps", "must be >= 2", s.num_steps)
    need(s.eval_num_steps >= 1, "sampling.eval_num_steps", "must be >= 1", s.eval_num_steps)
    need(s.guidance_scale >= 0, "sampling.guidance_scale", "must be >= 0", s.guidance_scale)
    need(0 <= s.noise_level <= 2, "sampling.noise_level", "must be in [0, 2]", s.noise_level)
    need(s.shift > 0, "sampling.shift", "must be > 0", s.shift)
    need(s.k >= 1, "sampling.k", "must be >= 1", s.k)
    need(not rl or s.noise_level > 0, "sampling.noise_level", "must be > 0 for policy-gradient training (the "
         "policy's log-probabilities need SDE steps)", s.noise_level)
    need(g.algo in ("step_grpo", "grpo"), "grpo.algo", "must be step_grpo or grpo", g.algo)
    need(not rl or s.k >= 2, "sampling.k", "must be >= 2 for policy-gradient training (advantages need a group)", s.k)
    if g.branch_steps is not None:
        bad = [i for i in g.branch_steps if not 0 <= i < s.num_steps - 1]
        need(not bad and len(g.branch_steps) > 0, "grpo.branch_steps",
             f"must be a non-empty list of step indices in [0, {s.num_steps - 2}] "
             f"(sampling.num_steps = {s.num_steps}; the last step is never trained)", g.branch_steps)
        need(len(set(g.branch_steps)) == len(g.branch_steps), "grpo.branch_steps", "must not repeat a step",
             g.branch_steps)
    need(g.continuation in ("random", "best", "mean"), "grpo.continuation", "must be random, best or mean",
         g.continuation)
    need(g.prompts_per_iter > 0, "grpo.prompts_per_iter", "must be > 0", g.prompts_per_iter)
    need(g.iterations > 0, "grpo.iterations", "must be > 0", g.iterations)
    need(0 < g.clip_eps < 1, "grpo.clip_eps", "must be in (0, 1)", g.clip_eps)
    need(g.updates_per_iter >= 1, "grpo.updates_per_iter", "must be >= 1", g.updates_per_iter)
    need(g.schedule in ("pipelined", "serial"), "grpo.schedule", "must be pipelined or serial", g.schedule)
    need(not rl or g.updates_per_iter <= g.prompts_per_iter, "grpo.updates_per_iter",
         f"must be at most grpo.prompts_per_iter = {g.prompts_per_iter} (a minibatch is a run of whole prompt "
         "groups)", g.updates_per_iter)
    need(g.beta >= 0, "grpo.beta", "must be >= 0", g.beta)
    need(g.adv_clip > 0, "grpo.adv_clip", "must be > 0", g.adv_clip)
    need(g.adv_norm in ("std", "mean"), "grpo.adv_norm", "must be std or mean", g.adv_norm)
    need(g.eval_every > 0, "grpo.eval_every", "must be > 0", g.eval_every)
    need(g.eval_panel_size > 0, "grpo.eval_panel_size", "must be > 0", g.eval_panel_size)
    need(g.checkpoint_every > 0, "grpo.checkpoint_every", "must be > 0", g.checkpoint_every)
    r = c.reward
    from drm_ray.reward.specs import parse_spec

    for field_name, items in (("reward.rewards", r.rewards), ("reward.judges", r.judges)):
        specs = []
        for item in items:
            try:
                specs.append(parse_spec(item))
            except ValueError as err:
                e.append(f"{field_name} = {list(items)!r}: {err}")
        names = [s.name for s in specs]
        need(len(set(names)) == len(names), field_name, "names each reward at most once (a second model of one "
             "kind names its own: clip@/models/CLIP-ViT-L-14)", list(items))
        kinds = {s.kind for s in specs}
        need("oracle" not in kinds or m.preset == "toy", field_name, "oracle grades toy-world images: only with "
             "model.preset=toy", list(items))
        bare = {s.kind for s in specs if s.source is None}  # these take their model from the kind's config field
        need("clip" not in bare or bool(r.clip_path), "reward.clip_path", f"is required when {field_name} has "
             "clip without '@source' (a local CLIPModel directory with its processor, e.g. PickScore)", r.clip_path)
        need("callable" not in bare or bool(r.callable), "reward.callable", f"is required when {field_name} has "
             "callable without '@source' ('package.module:function')", r.callable)
    need(len(r.rewards) > 0, "reward.rewards", "must name at least one reward", r.rewards)
    d = c.drm
    need(d.n_drop >= 0, "drm.n_drop", "must be >= 0", d.n_drop)
    need(d.head in ("mlp", "mean"), "drm.head", "must be mlp or mean", d.head)
    need(d.head_dim > 0, "drm.head_dim", "must be > 0", d.head_dim)
    need(d.init in ("pretrained", "random"), "drm.init", "must be pretrained or random", d.init)
    need(d.lr > 0, "drm.lr", "must be > 0", d.lr)
    need(d.batch_size > 0, "drm.batch_size", "must be > 0", d.batch_size)
    need(d.num_workers > 0, "drm.num_workers", "must be > 0", d.num_workers)
    micro, _ = c.drm_accumulation()
    need(micro > 0 and d.batch_size % (micro * max(d.num_workers, 1)) == 0, "drm.micro_batch",
         f"drm.batch_size ({d.batch_size}) must be a multiple of drm.micro_batch x drm.num_workers "
         f"({micro} x {d.num_workers}): the accumulation count must be a whole number", d.micro_batch)
    need(d.train_steps > 0, "drm.train_steps", "must be > 0", d.train_steps)
    need(d.log_every > 0, "drm.log_every", "must be > 0", d.log_every)
    need(d.checkpoint_every > 0, "drm.checkpoint_every", "must be > 0", d.checkpoint_every)
    need(d.val_every >= 0, "drm.val_every", "must be >= 0 (0 disables validation)", d.val_every)
    need(d.val_pairs > 0, "drm.val_pairs", "must be > 0", d.val_pairs)
    need(len(d.val_timesteps) > 0 and all(0 <= t <= 1000 for t in d.val_timesteps), "drm.val_timesteps",
         "must be a non-empty list of t in [0, 1000]", d.val_timesteps)
    need(0 <= d.zero_noise_prob <= 1, "drm.zero_noise_prob", "must be in [0, 1]", d.zero_noise_prob)
    need(d.pair_noise in ("independent", "shared"), "drm.pair_noise", "must be independent or shared", d.pair_noise)
    need(d.max_grad_norm > 0, "drm.max_grad_norm", "must be > 0", d.max_grad_norm)
    need(d.num_cpus >= 0, "drm.num_cpus", "must be >= 0", d.num_cpus)
    need(m.num_layers >= d.n_drop + 1, "model.num_layers", f"must exceed drm.n_drop ({d.n_drop})", m.num_layers)
    need(d.train_blocks is None or 0 <= d.train_blocks <= m.num_layers - d.n_drop, "drm.train_blocks",
         f"must be null (all) or between 0 (the head only) and the kept blocks ({m.num_layers - d.n_drop})",
         d.train_blocks)
    da = c.data
    need(da.encoder_workers > 0, "data.encoder_workers", "must be > 0", da.encoder_workers)
    need(da.encoder_gpus >= 0, "data.encoder_gpus", "must be >= 0", da.encoder_gpus)
    need(da.encoder_batch_size > 0, "data.encoder_batch_size", "must be > 0", da.encoder_batch_size)
    need(da.shard_rows > 0, "data.shard_rows", "must be > 0", da.shard_rows)
    need(da.latent_dtype in ("float32", "bfloat16", "float16"), "data.latent_dtype",
         "must be float32, bfloat16 or float16", da.latent_dtype)
    ro = c.rollout
    need(ro.num_workers > 0, "rollout.num_workers", "must be > 0", ro.num_workers)
    need(ro.num_scorers > 0, "rollout.num_scorers", "must be > 0", ro.num_scorers)
    need(ro.num_gpus >= 0, "rollout.num_gpus", "must be >= 0", ro.num_gpus)
    need(ro.num_cpus >= 0, "rollout.num_cpus", "must be >= 0", ro.num_cpus)
    need(ro.groups_per_call > 0, "rollout.groups_per_call", "must be > 0", ro.groups_per_call)
    need(ro.max_restarts >= 0, "rollout.max_restarts", "must be >= 0", ro.max_restarts)
    need(ro.timeout_s > 0, "rollout.timeout_s", "must be > 0", ro.timeout_s)
    need(ro.autoscale_wait_s >= 0, "rollout.autoscale_wait_s", "must be >= 0", ro.autoscale_wait_s)
    le = c.learner
    need(le.num_workers > 0, "learner.num_workers", "must be > 0", le.num_workers)
    need(le.lr > 0, "learner.lr", "must be > 0", le.lr)
    need(le.num_cpus >= 0, "learner.num_cpus", "must be >= 0", le.num_cpus)
    need(le.publish_dtype in ("float32", "bfloat16", "float16"), "learner.publish_dtype",
         "must be float32, bfloat16 or float16", le.publish_dtype)
    need(le.weight_decay >= 0, "learner.weight_decay", "must be >= 0", le.weight_decay)
    need(le.max_grad_norm > 0, "learner.max_grad_norm", "must be > 0", le.max_grad_norm)
    need(le.max_failures >= 0, "learner.max_failures", "must be >= 0", le.max_failures)
    need(le.micro_batch_states > 0, "learner.micro_batch_states", "must be > 0", le.micro_batch_states)
    need(le.state_every > 0, "learner.state_every", "must be > 0", le.state_every)
    for name, items in (("rollout.resources", ro.resources), ("learner.resources", le.resources),
                        ("drm.resources", d.resources)):
        for item in items:
            key, _, amount = item.partition("=")
            need(bool(re.fullmatch(r"[A-Za-z_][\w.:/-]*", key)) and key not in ("CPU", "GPU", "memory")
                 and bool(re.fullmatch(r"\d+\.?\d*|\.\d+", amount)) and float(amount or 0) > 0, name,
                 "entries must look like name=amount with amount > 0 (CPU and GPU have their own fields)", item)
    need(c.deepspeed.zero_stage in (0, 1, 2), "deepspeed.zero_stage", "must be 0, 1 or 2 (LoRA params are small; "
         "ZeRO-3 partitions nothing useful here)", c.deepspeed.zero_stage)
    need(bool(c.run.output_dir), "run.output_dir", "must be a non-empty path", c.run.output_dir)
    need(bool(c.tracking.experiment), "tracking.experiment", "must be non-empty", c.tracking.experiment)
    return e
