"""Scale rehearsal: SD3.5-Medium-width components at reduced depth through every stage of the sd35m path, on a CPU,
with every per-item cost measured and projected to the paper's sizes (not a test).

    python bench/scale.py                          # about 10 minutes on 2 CPU cores; writes docs/SCALE.md
    python bench/scale.py --depth 2 --pairs 24 --out outputs/scale
    python bench/scale.py --stages report          # rewrite docs/SCALE.md from <out>/results.json

What runs, each stage through the real job on the `sd35m` preset (CPU overrides only: no GPUs, float32, one
worker per role), so the sd35m code path itself is rehearsed:

1. `model`: a random-init StableDiffusion3Pipeline directory with SD3.5-Medium's widths (DiT: 24 heads x 64 =
   1536, joint attention 4096, pooled 2048, caption projection 1536, dual attention and RMS qk-norm, 16 latent
   channels; text encoders of CLIP-L / CLIP-G / T5-XXL width with one layer each; T5 context 256 tokens, so
   prompt embeddings are [333, 4096]), only the depth reduced (`--depth`, 2 DiT blocks by default). The VAE keeps
   SD3's latent format ([16, 64, 64] at 512 px, scaling and shift factors) but narrow channels: its compute on a
   CPU would take most of the budget and is not what this rehearsal measures. Loaded by the jobs from model.path.
2. `data`: `--pairs` synthetic 512 px preference pairs in TWO Parquet files of one directory (multi-file input),
   a held-out file, and an RL prompt file.
3. `preprocess`: jobs/preprocess.py -> the embedding cache; bytes per pair and per distinct prompt from meta.json.
4. `drm`: jobs/train_drm.py, one optimizer step of micro-batch 1 accumulated to batch 2, activation checkpointing,
   validation on a held-out Parquet that the job encodes itself (drm.n_drop = 1 at depth 2: the DRM keeps 1 block).
5. `rl`: jobs/step_grpo.py, one Step-GRPO iteration (1 prompt, 3 steps, k = 2) with an evaluation panel: bytes
   through the driver and rollout payload bytes per iteration, from the job's MLflow metrics.
6. `activations`: in this process, the bytes autograd saves for backward per sequence and per block (DRM training
   with and without checkpointing; the policy with a LoRA adapter, as the learner runs it).
During stages 3-5 a sampler reads the resident memory of every process the job starts (Ray actors by their process
title), so each role's peak RSS is measured. `report` writes docs/SCALE.md: measured numbers, and projections to
24 blocks, 1.4M pairs, 25k RL prompts and the sd35m layout, each row saying what was measured and what assumed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, setup_env  # noqa: E402

setup_env()
from scale_report import (  # noqa: E402
    CLIP_G, CLIP_L, RESOLUTION, SD35M_DIT, SD35M_DUAL_BLOCKS, T5_TOKENS, T5_XXL, exact_params, write_doc,
)

REHEARSAL_VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16)

STAGES = ("model", "data", "preprocess", "drm", "rl", "activations", "report")


# ---------------------------------------------------------------------------------------------- stage 1-2


def write_model(directory: Path, depth: int) -> dict:
    """The rehearsal pipeline directory (random init, SD3.5-Medium widths, `depth` blocks)."""
    import torch
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from drm_ray.models.tiny_text import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)

    def clip(dims):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, **{**dims, "num_hidden_layers": 1}, max_position_embeddings=77, bos_token_id=0,
            eos_token_id=1, pad_token_id=1, hidden_act="gelu"))

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35M_DIT, num_layers=depth,
                                          dual_attention_layers=tuple(range(min(depth, SD35M_DUAL_BLOCKS)))),
        vae=AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, sample_size=1024,
                          scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False, **REHEARSAL_VAE),
        text_encoder=clip(CLIP_L), text_encoder_2=clip(CLIP_G),
        text_encoder_3=T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": 1}, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0)),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), tokenizer_3=tiny_t5_tokenizer(T5_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipe, name).to(torch.bfloat16)  # stored in bf16 as published; the jobs load them as model.dtype
    start = time.perf_counter()
    pipe.save_pretrained(directory)
    return {"depth": depth, "params": params, "write_s": time.perf_counter() - start,
            "disk_bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())}


def write_data(work: Path, n_pairs: int) -> dict:
    """Two training Parquet files in one directory, a held-out file, and the RL prompt file."""
    import pyarrow.parquet as pq

    from drm_ray.data.synthetic import write_synthetic_parquet

    pairs = work / "pairs"
    pairs.mkdir(parents=True, exist_ok=True)
    half = n_pairs // 2
    write_synthetic_parquet(pairs / "part-0.parquet", half, RESOLUTION, seed=1)
    write_synthetic_parquet(pairs / "part-1.parquet", n_pairs - half, RESOLUTION, seed=2)
    write_synthetic_parquet(work / "heldout.parquet", 8, RESOLUTION, seed=3)
    prompts = sorted({p for f in sorted(pairs.glob("*.parquet")) for p in pq.read_table(f)["prompt"].to_pylist()})
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {"pairs": n_pairs, "distinct_prompts": len(prompts),
            "parquet_bytes": sum(p.stat().st_size for p in pairs.glob("*.parquet"))}


# ---------------------------------------------------------------------------------------------- jobs + memory


def role_of(title: str) -> str | None:
    """A Ray process title (`ray::RolloutWorker.rollout`) -> the role it plays; None for processes to ignore."""
    for needle, role in (("RolloutWorker", "rollout worker"), ("RewardScorer", "reward scorer"),
                         ("RayTrainWorker", "train worker"), ("PairEncoder", "encoder actor"),
                         ("MapWorker", "encoder actor"), ("encode_prompt", "prompt table task"),
                         ("Coordinator", "ray control actors"), ("Controller", "ray control actors")):
        if needle in title:
            return role
    return "ray system"


class RSSSampler:
    """Peak resident memory per role of a job and every process under it, sampled every `period_s`."""

    def __init__(self, pid: int, period_s: float = 0.25):
        self.pid, self.period_s = pid, period_s
        self.peak_mb: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            system = 0.0
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    title = " ".join(p.cmdline())[:200]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                role = "driver" if p.pid == self.pid else role_of(title)
                if role == "ray system":
                    system += rss
                else:
                    self.peak_mb[role] = max(self.peak_mb.get(role, 0.0), rss)
            self.peak_mb["ray system (sum)"] = max(self.peak_mb.get("ray system (sum)", 0.0), system)
            time.sleep(self.period_s)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join(timeout=5)
        return {k: round(v) for k, v in sorted(self.peak_mb.items())}


def run_job(script: str, args: list[str], log: Path, timeout_s: float) -> dict:
    """Run jobs/<script> with `args`; returns wall seconds and peak RSS per role; raises with the log's tail."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = RSSSampler(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        peak = sampler.finish()
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"jobs/{script} failed ({code}); the end of {log}:\n{tail}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak}


def cpu_overrides(model_dir: Path, out: Path) -> list[str]:
    """The sd35m preset on this CPU machine: no GPUs, float32, one worker per role, no custom resources."""
    return [f"model.path={model_dir}", "model.dtype=float32", f"run.output_dir={out}",
            "rollout.num_gpus=0", "rollout.num_cpus=0.25", "rollout.resources=[]", "rollout.num_workers=1",
            "learner.use_gpu=false", "learner.num_workers=1", "learner.num_cpus=0.5", "learner.resources=[]",
            "learner.publish_dtype=float32", "deepspeed.bf16=false", "drm.use_gpu=false", "drm.num_workers=1",
            "drm.num_cpus=0.5", "drm.n_drop=1", "data.encoder_gpus=0", "data.encoder_workers=1",
            "data.encoder_batch_size=8"]


def stage_preprocess(work: Path, model_dir: Path) -> dict:
    common = ["--config", "sd35m", *cpu_overrides(model_dir, work / "preprocess_run")]
    train = run_job("preprocess.py", [*common, "--pairs", str(work / "pairs"), "--out", str(work / "cache")],
                    work / "preprocess.log", 1200)
    meta = json.loads((work / "cache" / "meta.json").read_text())
    return {**train, "meta": meta}


def stage_drm(work: Path, model_dir: Path) -> dict:
    # One optimizer step of 2 accumulated micro-steps; validation on a held-out Parquet the job encodes itself.
    args = ["--config", "sd35m", *cpu_overrides(model_dir, work / "drm_run"), "--cache", str(work / "cache"),
            f"data.heldout_data={work / 'heldout.parquet'}", "drm.batch_size=2", "drm.micro_batch=1",
            "drm.gradient_checkpointing=true", "drm.train_steps=1", "drm.log_every=1", "drm.checkpoint_every=1",
            "drm.val_every=1", "drm.val_pairs=4", "drm.val_timesteps=[0,750]"]
    return run_job("train_drm.py", args, work / "train_drm.log", 1200)


def stage_rl(work: Path, model_dir: Path) -> dict:
    out = work / "rl_run"
    args = ["--config", "sd35m", *cpu_overrides(model_dir, out), f"reward.drm_path={work / 'drm_run' / 'drm'}",
            f"data.prompts={work / 'prompts.txt'}", "sampling.num_steps=3", "sampling.k=2",
            "grpo.prompts_per_iter=1", "rollout.groups_per_call=1", "grpo.iterations=1", "grpo.eval_every=1",
            "grpo.eval_panel_size=1", "sampling.eval_num_steps=2", "learner.micro_batch_states=1",
            "rollout.timeout_s=1200"]
    result = run_job("step_grpo.py", args, work / "step_grpo.log", 1500)
    result["metrics"] = mlflow_metrics(out / "mlflow.db", step=1)
    return result


def mlflow_metrics(db: Path, step: int) -> dict[str, float]:
    """Every metric the RL job logged at `step` (its only iteration)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute("select key, value from metrics where step = ?", (step,)).fetchall()
    return {key: value for key, value in rows}


# ---------------------------------------------------------------------------------------------- activations


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the `with` block, each storage counted once, the
    `exclude` tensors (parameters: a Linear saves its weight, which is no activation) left out. `marks()` gives
    forward hooks that record the running total as a module starts and ends, so bytes can be attributed to blocks."""

    def __init__(self, exclude):
        import torch

        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.total = 0
        self.spans: list[list[int]] = []

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def watch(self, modules) -> list:
        """Record [start, end] totals around each module's forward; returns the hook handles."""
        handles = []
        for m in modules:
            span: list[int] = []
            self.spans.append(span)
            handles.append(m.register_forward_pre_hook(lambda *_, s=span: s.append(self.total)))
            handles.append(m.register_forward_hook(lambda *_, s=span: s.append(self.total)))
        return handles

    def per_module(self) -> list[int]:
        """Bytes saved inside each watched module's forward."""
        return [s[1] - s[0] for s in self.spans]

    def between_starts(self) -> list[int]:
        """Bytes saved from one watched module's start to the next one's: under activation checkpointing the block
        itself saves nothing, and what it keeps (its inputs) is saved by the checkpoint just before it starts."""
        return [b[0] - a[0] for a, b in zip(self.spans, self.spans[1:])]

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def stage_activations(model_dir: Path, depth: int) -> dict:
    """Saved-for-backward bytes per sequence (float32 on this CPU): DRM training with and without activation
    checkpointing, per kept block and for the embedders + head; the policy under a LoRA adapter (the learner)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from drm_ray.config import SD3_LORA_TARGETS
    from drm_ray.models.lora import add_lora
    from drm_ray.reward.model import build_drm

    torch.manual_seed(0)
    latent = RESOLUTION // 8
    x = torch.randn(1, 16, latent, latent)
    ctx, pooled = torch.randn(1, 77 + T5_TOKENS, 4096), torch.randn(1, 2048)
    sigma = torch.tensor([0.6])
    out: dict = {}
    for ckpt in (False, True):
        drm = build_drm(SD3Transformer2DModel.from_pretrained(model_dir / "transformer"), n_drop=0,
                        latent_size=latent).train()
        drm.gradient_checkpointing = ckpt
        start = time.perf_counter()
        with SavedBytes(list(drm.parameters())) as saved:
            saved.watch(drm.blocks)
            r = drm(x, sigma, ctx, pooled)
        r.sum().backward()
        out["drm_ckpt" if ckpt else "drm_plain"] = {
            "total": saved.total, "per_block": saved.between_starts() if ckpt else saved.per_module(),
            "fwd_bwd_s": round(time.perf_counter() - start, 2)}
    policy = SD3Transformer2DModel.from_pretrained(model_dir / "transformer")
    lora = add_lora(policy, 32, 64.0, SD3_LORA_TARGETS)
    policy.train()
    start = time.perf_counter()
    with SavedBytes(list(policy.parameters())) as saved:
        saved.watch(policy.transformer_blocks)
        v = policy(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma * 1000)
    v.sample.sum().backward()
    out["policy_lora"] = {"total": saved.total, "per_block": saved.per_module(),
                          "lora_params_per_block": sum(p.numel() for p in lora) / depth,
                          "fwd_bwd_s": round(time.perf_counter() - start, 2)}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2, help="DiT blocks of the rehearsal model (>= 2)")
    parser.add_argument("--pairs", type=int, default=24, help="training preference pairs (512 px)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "scale"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "SCALE.md"))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args(argv)
    if args.depth < 2:
        parser.error("--depth must be >= 2 (the rehearsal DRM drops one block)")
    import platform

    from drm_ray.config import load_config

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    r = json.loads(results_file.read_text()) if results_file.is_file() else {}
    model_dir = work / "model"
    cfg = load_config("sd35m")
    steps = 3 - 1  # the rehearsal's RL iteration: 3 sampling steps, branching on all but the last, k = 2
    for stage in args.stages:
        start = time.perf_counter()
        print(f"[scale] stage {stage} ...", flush=True)
        if stage == "model":
            r["model"] = write_model(model_dir, args.depth)
            r["params"] = exact_params()
        elif stage == "data":
            r["data"] = write_data(work, args.pairs)
        elif stage == "preprocess":
            r["preprocess"] = stage_preprocess(work, model_dir)
        elif stage == "drm":
            r["drm"] = stage_drm(work, model_dir)
        elif stage == "rl":
            r["rl"] = stage_rl(work, model_dir)
            r["rl"]["latents_per_group"] = steps + steps * 2 + 1
        elif stage == "activations":
            r["activations"] = stage_activations(model_dir, args.depth)
        elif stage == "report":
            r.setdefault("stage_s", {}).pop("report", None)
            r.update(host=f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} CPUs)",
                     date=time.strftime("%Y-%m-%d"), drm_workers=cfg.drm.num_workers)
            write_doc(r, Path(args.doc))
            print(Path(args.doc).read_text(), flush=True)
        r.setdefault("stage_s", {})[stage] = round(time.perf_counter() - start, 1)
        print(f"[scale] stage {stage} done in {r['stage_s'][stage]:.0f}s", flush=True)
        results_file.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
