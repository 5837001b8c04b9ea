"""GPU check: cost and peak memory of each role at SD3.5-Medium size, random init, no downloads (not a test).

    python bench/gpu_check.py                          # one GPU: SD3.5-M-sized DiT in bf16 at 512 px
    python bench/gpu_check.py --dry-run                # the same code path, tiny dims, CPU, float32, seconds
    python bench/gpu_check.py --out /tmp/gpu_check.txt --steps 4 --k 6

A random-init `SD3Transformer2DModel` with SD3.5-Medium's configuration (24 blocks, 24 heads x 64, joint attention
dim 4096, pooled 2048, caption projection 1536, pos_embed_max_size 384, dual attention in blocks 0-12, RMS qk-norm),
512 px (latents 16 x 64 x 64), prompt embeddings [B, 333, 4096] (77 CLIP + 256 T5 tokens) and pooled [B, 2048].
Weights are random, so only time and memory mean anything. Roles, each from an empty GPU (peak memory reset):

1. policy: CFG forward (one prompt: 2 latents) of the DiT with a LoRA r = 32 adapter;
2. DRM: the DiT minus its last 3 blocks plus the mlp head, forward at batch k; and one training step of it as a
   DRM trainer worker takes it (`--drm-micro` pairs, activation checkpointing, ZeRO-2 over all its parameters, world
   size 1: the whole optimizer state on one GPU);
3. learner: one Step-GRPO update, LoRA r = 32 under DeepSpeed ZeRO-2 (bf16, single process, NCCL with world
   size 1), on the states of a real branching rollout (1 prompt, k children, `--steps` steps), 1 state per
   micro-batch, beta > 0 (reference forward with the adapter disabled);
4. step-wise sampling, policy + DRM: `--steps` steps for one prompt at k = 1 and at k (the paper: about 3.4x at
   k = 6 with 10 steps).

Times are the mean over `--repeats` runs after a warm-up, synchronized. The table goes to stdout and to `--out`
after every role, so a run cut short still leaves what it measured; `--budget-s` (default 450 s) stops before a
role that would start past it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm")
# the same architecture features (dual attention, qk-norm) at the tiny preset's sizes
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")


class Check:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        self.dims = TINY if args.tiny else SD35M
        self.latent = args.resolution // 8
        self.seq = 77 + args.t5_tokens
        self.rows: list[list] = []
        self.start = time.perf_counter()

    # ------------------------------------------------------------------------------------------ helpers

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**30
        for line in Path("/proc/self/status").read_text().splitlines():  # CPU: the process's peak RSS (VmHWM)
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        return float("nan")

    def timed(self, fn, repeats: int | None = None) -> float:
        fn()  # warm-up (kernels, allocator)
        self.sync()
        start, n = time.perf_counter(), repeats or self.args.repeats
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - start) / n

    def transformer(self, seed: int = 0):
        from diffusers import SD3Transformer2DModel

        self.torch.manual_seed(seed)
        default = self.torch.get_default_dtype()
        # built in place, in the target dtype: no host copy and no float32 transient in the role's peak
        self.torch.set_default_dtype(self.dtype)
        try:
            with self.torch.device(self.device):
                model = SD3Transformer2DModel(**self.dims)
        finally:
            self.torch.set_default_dtype(default)
        return model.eval()

    def conditioning(self, b: int):
        g = self.torch.Generator().manual_seed(1)
        d, p = self.dims["joint_attention_dim"], self.dims["pooled_projection_dim"]
        mk = lambda *shape: self.torch.randn(*shape, generator=g).to(self.device)  # noqa: E731
        return mk(b, self.seq, d), mk(b, p), mk(b, self.seq, d), mk(b, p)  # embeds, pooled, neg, neg_pooled

    def latents(self, b: int, seed: int = 2):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randn(b, 16, self.latent, self.latent, generator=g).to(self.device)

    def sigmas(self, steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from drm_ray.diffusion.flow import schedule_sigmas

        return schedule_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), steps)

    def add(self, role: str, what: str, seconds: float, note: str = ""):
        self.rows.append([role, what, f"{seconds:.4f}", f"{self.peak_gib():.2f}", note])
        self.write()

    def write(self):
        header = ["role", "measured", "seconds", "peak GiB", "note"]
        widths = [max(len(h), *(len(str(r[i])) for r in self.rows)) for i, h in enumerate(header)]
        line = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
        name = self.torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        text = "\n".join([f"gpu_check: {'tiny' if self.args.tiny else 'SD3.5-M-sized'} random-init DiT, "
                          f"{self.dtype}, {self.args.resolution} px, device {self.device} ({name}), k = {self.args.k}, "
                          f"{self.args.steps} steps; peak = max allocated (GPU) or process RSS (CPU)",
                          line(header), "-+-".join("-" * w for w in widths), *map(line, self.rows)])
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(text + "\n")
        return text

    def within_budget(self, role: str) -> bool:
        if time.perf_counter() - self.start < self.args.budget_s:
            return True
        self.rows.append([role, "skipped", "", "", f"past --budget-s {self.args.budget_s}"])
        self.write()
        return False

    def process_group(self):
        """torch.distributed with world size 1 in this process, as DeepSpeed expects (torchrun's variables)."""
        import torch.distributed as dist

        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            os.environ[key] = value
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    # ------------------------------------------------------------------------------------------ roles

    def policy(self):
        from drm_ray.config import SD3_LORA_TARGETS
        from drm_ray.diffusion.sampling import predict_velocity
        from drm_ray.models.lora import add_lora

        self.reset()
        t = self.transformer()
        add_lora(t, self.args.rank, 2.0 * self.args.rank, SD3_LORA_TARGETS)
        e, p, ne, npool = self.conditioning(1)
        x = self.latents(1)
        with self.torch.no_grad():
            sec = self.timed(lambda: predict_velocity(t, x, 0.8, e, p, ne, npool, 4.5))
        params = sum(q.numel() for q in t.parameters()) / 1e6
        self.add("policy", "CFG forward, 1 prompt (2 latents)", sec, f"{params:.1f}M params incl. LoRA")

    def drm(self):
        from drm_ray.reward.model import build_drm

        self.reset()
        drm = build_drm(self.transformer(), n_drop=3, head="mlp", latent_size=self.latent).eval()
        k = self.args.k
        e, p, _, _ = self.conditioning(k)
        x, lvl = self.latents(k), self.torch.full((k,), 0.6, device=self.device)
        with self.torch.no_grad():
            sec = self.timed(lambda: drm(x, lvl, e, p))
        self.add("DRM", f"forward, batch k = {k}", sec, f"{len(drm.blocks)} blocks")

    def drm_train(self):
        """One DRM optimizer step as a DRM trainer worker takes it: --drm-micro pairs (2x sequences) per micro-step,
        activation checkpointing, DeepSpeed ZeRO-2 over every DRM parameter with world size 1 (so the whole fp32
        optimizer state sits on this GPU; with drm.num_workers = W a worker holds 1/W of it). The process group stays
        up for the learner role (DeepSpeed keeps a handle on it)."""
        from drm_ray.algorithms.losses import bradley_terry_loss
        from drm_ray.data.cache import PairBatch
        from drm_ray.reward.model import build_drm, score_noised_pairs
        from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine

        self.reset()
        self.process_group()
        b = self.args.drm_micro
        drm = build_drm(self.transformer(), n_drop=3, head="mlp", latent_size=self.latent).train()
        drm.requires_grad_(True)
        drm.gradient_checkpointing = True
        e, p, _, _ = self.conditioning(b)
        batch = PairBatch(self.latents(b), self.latents(b, seed=3), e, p, self.torch.ones(b), ["random"] * b)
        g = self.torch.Generator().manual_seed(6)
        s, eps = self.torch.full((b,), 0.6), self.torch.randn(2, *batch.latent_win.shape, generator=g)
        bf16 = self.dtype != self.torch.float32
        engine, _ = init_engine(drm, drm.parameters(), 1e-5, 0.0, deepspeed_config(b, 1, 1, 2, bf16, 1.0))

        def step():
            r_w, r_l = score_noised_pairs(engine, batch, s, eps)
            loss, _ = bradley_terry_loss(r_w, r_l)
            engine.backward(loss)
            engine.step()

        self.reset()  # the worker's own peak: weights, gradients, optimizer state, activations
        sec = self.timed(step, repeats=1)
        params = sum(q.numel() for q in drm.parameters()) / 1e9
        self.add("DRM trainer", f"step: {b} pairs ({2 * b} sequences), checkpointing, ZeRO-2 x 1", sec,
                 f"{params:.2f}B params, all trained; {len(drm.blocks)} blocks")

    def learner(self):
        import torch.distributed as dist

        from drm_ray.algorithms.rl_batch import learner_batch
        from drm_ray.config import SD3_LORA_TARGETS
        from drm_ray.data.prompt_table import PromptTable
        from drm_ray.diffusion.rollout import branching_rollout
        from drm_ray.models.lora import add_lora
        from drm_ray.workers.deepspeed_engine import deepspeed_config, init_engine
        from drm_ray.workers.learner import train_update

        self.reset()
        self.process_group()
        t = self.transformer()
        params = add_lora(t, self.args.rank, 2.0 * self.args.rank, SD3_LORA_TARGETS)
        e, p, ne, npool = self.conditioning(1)
        table = PromptTable(["random"], e.cpu().float(), p.cpu().float(), ne[0].cpu().float(), npool[0].cpu().float())
        sigmas, k = self.sigmas(self.args.steps), self.args.k
        branch = tuple(range(self.args.steps - 1))
        gens = [self.torch.Generator().manual_seed(3)]
        out = branching_rollout(t, sigmas, self.latents(1), e, p, ne, npool, 4.5, 0.7, k, branch, gens)
        steps = self.torch.tensor(out.steps)
        rollout = type("R", (), dict(states=out.states[0].cpu(), step_index=steps, children=out.children[0].cpu(),
                                     log_probs=out.log_probs[0].cpu(), final=out.final.cpu(), prompt_index=0))
        scores = [self.torch.randn(len(branch), k, generator=self.torch.Generator().manual_seed(4))]
        batch, _ = learner_batch([rollout], "step_grpo", scores, self.torch.zeros(1, 1), len(branch), 5.0)
        n = batch["states"].shape[0]
        engine, _ = init_engine(t, params, 1e-4, 0.0, deepspeed_config(1, n, 1, 2, self.dtype != self.torch.float32,
                                                                        1.0))
        cfg = dict(grad_accum=n, guidance_scale=4.5, noise_level=0.7, clip_eps=1e-4, beta=0.004)
        self.reset()  # the learner's own peak: weights, LoRA + optimizer state, activations
        sec = self.timed(lambda: train_update(engine, t, batch, n, 1, table, sigmas, cfg), repeats=1)
        self.add("learner", f"update: {n} states x {k} children, ZeRO-2, LoRA r={self.args.rank}", sec,
                 f"{sum(q.numel() for q in params) / 1e6:.1f}M LoRA params; 1 state per micro-batch")
        dist.destroy_process_group()

    def stepwise(self):
        from drm_ray.diffusion.stepwise import stepwise_sample
        from drm_ray.reward.model import build_drm

        self.reset()
        t = self.transformer()
        drm = build_drm(self.transformer(seed=1), n_drop=3, head="mlp", latent_size=self.latent).eval()
        e, p, ne, npool = self.conditioning(1)
        sigmas = self.sigmas(self.args.steps)

        def sample(k):
            gens = [self.torch.Generator().manual_seed(5)]
            return stepwise_sample(t, sigmas, e, p, self.latents(1), k=k, noise_level=0.7, generator=gens,
                                   scorer=(lambda lat, lvl, rows: drm(lat, lvl.to(self.device), e[rows.to(e.device)],
                                                                      p[rows.to(p.device)]))
                                   if k > 1 else None, neg_embeds=ne, neg_pooled=npool, guidance_scale=4.5)

        with self.torch.no_grad():
            one = self.timed(lambda: sample(1))
            many = self.timed(lambda: sample(self.args.k))
        self.add("step-wise sampling", f"k = 1, {self.args.steps} steps, 1 prompt", one, "policy + DRM resident")
        self.add("step-wise sampling", f"k = {self.args.k}, {self.args.steps} steps, 1 prompt", many,
                 f"{many / one:.2f}x k = 1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny --dtype float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny dims (same code path)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default bfloat16 (float32 with --tiny on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    parser.add_argument("--t5-tokens", type=int, default=None, help="T5 tokens (default 256; 32 with --tiny)")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the rollout / step-wise sampling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--drm-micro", type=int, default=4, help="pairs per DRM training micro-step (drm.micro_batch)")
    parser.add_argument("--roles", default="policy,drm,drm_train,learner,stepwise")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check.txt"))
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.t5_tokens = args.t5_tokens or (32 if args.tiny else 256)
    # DeepSpeed picks its accelerator at import: CPU only where the check runs on the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cpu else "cuda")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if cpu:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run (or --device cpu --tiny)")
    check = Check(args)
    for role in args.roles.split(","):
        if check.within_budget(role):
            getattr(check, role)()
            print(f"[gpu_check] {role} done at {time.perf_counter() - check.start:.0f} s", flush=True)
    print("\n" + check.write(), flush=True)
    print(f"[gpu_check] table written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
