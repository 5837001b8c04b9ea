"""The scale rehearsal's report (bench/scale.py): exact parameter counts of the published SD3.5-Medium components,
projections of the rehearsal's measurements to the paper's sizes, and docs/SCALE.md."""

from __future__ import annotations

from pathlib import Path

from common import format_table

RESOLUTION = 512
T5_TOKENS = 256
SD35M_DIT = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm")
SD35M_DUAL_BLOCKS = 13          # blocks 0-12 of SD3.5-Medium use dual attention (MMDiT-X)
# The published text encoders' configs (for exact parameter counts; the rehearsal builds them with one layer).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
SD3_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

# The paper's setup (issue 13 and drm_ray/configs/sd35m.yaml).
PAPER = dict(blocks=24, n_drop=3, pairs=1_400_000, rl_prompts=25_000, drm_batch=128)
# Prompt repetition of a real preference set: Pick-a-Pic v1 has 583,747 training pairs and about 35,000 distinct
# prompts (its paper: "over 500,000 examples and 35,000 distinct prompts"), about 17 pairs per prompt. Assumed, not
# measured here; the report also gives the worst case of one prompt per pair.
PAIRS_PER_PROMPT = 17.0



# ---------------------------------------------------------------------------------------------- projection


def exact_params() -> dict[str, int]:
    """Parameter counts of the published SD3.5-Medium components, built on the meta device (no memory, no
    download): the DiT (24 blocks), the DRM's kept part, CLIP-L, CLIP-G, T5-XXL's encoder and SD3's VAE."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        dit = SD3Transformer2DModel(**SD35M_DIT, num_layers=PAPER["blocks"],
                                    dual_attention_layers=tuple(range(SD35M_DUAL_BLOCKS)))
        dropped = sum(count(b) for b in dit.transformer_blocks[-PAPER["n_drop"]:])
        out = {"dit": count(dit), "dit_dropped_blocks": dropped,
               "dit_final_layers": count(dit.norm_out) + count(dit.proj_out),
               "clip_l": count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_L))),
               "clip_g": count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_G))),
               "t5_xxl": count(T5EncoderModel(T5Config(**T5_XXL))),
               "vae": count(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4, **SD3_VAE))}
    width = SD35M_DIT["num_attention_heads"] * SD35M_DIT["attention_head_dim"]
    tokens = (RESOLUTION // 8 // 2) ** 2
    head = (2 * width + width * width + width) + (width * 4 + 4) + (4 * tokens + 1)  # LayerNorm, MLP, out (head_dim 4)
    out["drm"] = out["dit"] - dropped - out["dit_final_layers"] + head
    return out


GB = 1e9


def projections(r: dict, cfg) -> tuple[list[list], list[list], dict]:
    """(GPU memory rows per role, host/disk/network rows, a summary) at the paper's sizes."""
    p = r["params"]
    act = r["activations"]
    half = 0.5  # measured in float32 on the CPU; bf16 activations take half
    blocks, kept = PAPER["blocks"], PAPER["blocks"] - PAPER["n_drop"]
    plain_block = act["drm_plain"]["per_block"][0]            # a regular (dual-attention) block, no checkpointing
    plain_rest = act["drm_plain"]["total"] - sum(act["drm_plain"]["per_block"])   # embedders + head
    ckpt_block = act["drm_ckpt"]["per_block"][0]              # what a checkpointed block keeps: its inputs
    ckpt_rest = act["drm_ckpt"]["total"] - len(act["drm_plain"]["per_block"]) * ckpt_block
    lora_block = act["policy_lora"]["per_block"][0]
    lora_last = act["policy_lora"]["per_block"][-1]
    lora_rest = act["policy_lora"]["total"] - sum(act["policy_lora"]["per_block"])
    micro, _ = cfg.drm_accumulation()
    drm_seq = 2 * micro                                       # winner + loser per pair
    drm_w = cfg.drm.num_workers
    learn_seq = 2 * cfg.learner.micro_batch_states            # CFG: conditional + unconditional per state
    roll_seq = 2 * cfg.rollout.groups_per_call
    lora = act["policy_lora"]["lora_params_per_block"] * blocks

    def zero2(n, w):  # bf16 weights + fp32 gradient partition + fp32 master / Adam m, v partitions (ZeRO paper)
        return 2 * n + (4 + 12) * n / w

    drm_plain = drm_seq * (plain_rest + kept * plain_block) * half
    drm_ckpt = drm_seq * (ckpt_rest + kept * ckpt_block + plain_block) * half  # + one block recomputed at a time
    learner_act = learn_seq * (lora_rest + (blocks - 1) * lora_block + lora_last) * half
    drm_state = zero2(p["drm"], drm_w)
    gpu = [  # role, weights + optimizer bytes, activation bytes (an upper bound for inference), how
        ["encoder actor (preprocess)", 2 * (p["t5_xxl"] + p["clip_l"] + p["clip_g"]) + 4 * p["vae"], 0.0,
         "weights exact (T5-XXL, CLIP-L/G in bf16, VAE fp32); activations of a 32-pair batch not measured (small)"],
        ["DRM trainer worker, no ckpt", drm_state, drm_plain,
         f"ZeRO-2 over {drm_w} workers; {drm_seq} sequences per micro-step x {kept} blocks (measured per block)"],
        ["DRM trainer worker, ckpt", drm_state, drm_ckpt,
         "checkpointing: each block keeps its inputs; one block recomputed at a time"],
        ["learner worker (LoRA r=32)", 2 * p["dit"] + 16 * lora, learner_act,
         f"{cfg.learner.micro_batch_states} states x CFG = {learn_seq} sequences through {blocks} blocks, "
         "no checkpointing"],
        ["rollout worker", 2 * p["dit"] + 2 * lora, roll_seq * plain_block * half,
         f"inference, {roll_seq} sequences: at most one block's activations (bound)"],
        ["DRM scorer", 2 * p["drm"], 64 * plain_block * half, "inference at batch 64: at most one block's activations"],
    ]
    meta = r["preprocess"]["meta"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[meta["latent_dtype"]]
    latent_values = 1
    for n in meta["latent_shape"]:
        latent_values *= n
    per_pair = 2 * latent_values * itemsize + 40  # payload: two latents + id, label, source
    measured_pair = meta["pair_bytes"] / meta["num_rows"]
    per_prompt = meta["prompt_bytes"] / meta["num_prompts"]
    pairs = PAPER["pairs"]
    cache_real = pairs * per_pair + pairs / PAIRS_PER_PROMPT * per_prompt
    cache_worst = pairs * (per_pair + per_prompt)
    table_node = PAPER["rl_prompts"] * per_prompt
    m = r["rl"]["metrics"]
    s, k = cfg.sampling.num_steps - 1, cfg.sampling.k
    per_latent = m["rollout/payload_bytes"] / r["rl"]["latents_per_group"]
    paper_latents = s + s * k + 1
    payload = cfg.grpo.prompts_per_iter * paper_latents * per_latent
    # the driver receives per group its records (log-probs [S, k]) and scores (S x k children + 1 final): per value
    driver = m["driver/bytes_in"] * cfg.grpo.prompts_per_iter * paper_latents / r["rl"]["latents_per_group"]
    host = [
        ["embedding cache, 1.4M pairs", f"{cache_real / 1e12:.2f} TB",
         f"{per_pair / 1e3:.0f} kB per pair (2 latents [16, 64, 64] {meta['latent_dtype']}; the rehearsal's shards "
         f"held {measured_pair / 1e3:.0f} kB: Parquet compresses its smooth synthetic latents) + "
         f"{per_prompt / 1e6:.2f} MB per distinct prompt (measured) x 1.4M / {PAIRS_PER_PROMPT:.0f} pairs per prompt "
         "(assumed: Pick-a-Pic's repetition)"],
        ["  same, one prompt per pair", f"{cache_worst / 1e12:.2f} TB", "upper bound: no prompt repeats"],
        ["  per million pairs", f"{cache_real / pairs * 1e6 / 1e12:.2f} TB",
         f"at {PAIRS_PER_PROMPT:.0f} pairs per prompt; the format before this change (fp32 latents, fp16 embeddings "
         f"per pair): {(2 * latent_values * 4 + per_prompt) * 1e6 / 1e12:.1f} TB"],
        ["RL prompt table, per node", f"{table_node / GB:.0f} GB",
         f"{PAPER['rl_prompts']:,} prompts x {per_prompt / 1e6:.2f} MB (float16, once per node in the object store; "
         f"float32 in every process before: {2 * table_node / GB:.0f} GB each)"],
        ["rollout payload per iteration", f"{payload / GB:.2f} GB",
         f"{cfg.grpo.prompts_per_iter} groups x ({s} states + {s}x{k} children + 1 final) x {per_latent / 1e3:.0f} kB "
         "(measured per latent); rollout node -> scorer and -> learner ranks, never through the driver"],
        ["driver bytes in per iteration", f"{driver / 1e3:.1f} kB",
         f"measured {m['driver/bytes_in']:.0f} B for 1 group of {r['rl']['latents_per_group']} latents, scaled per "
         "scored latent; independent of the latent size (tests/test_data_plane.py)"],
    ]
    used = [(role, w + a) for role, w, a, _ in gpu if "no ckpt" not in role]  # the sd35m settings: checkpointing on
    summary = {"cache_tb_per_million": cache_real / pairs * 1e6 / 1e12,
               "largest_role": max(used, key=lambda x: x[1]), "over_80gb": [role for role, b in used if b >= 80 * GB]}
    return gpu, host, summary


def report(r: dict) -> tuple[str, dict]:
    """The projection tables as text, and the summary."""
    from drm_ray.config import load_config

    cfg = load_config("sd35m")
    gpu, host, summary = projections(r, cfg)
    rows = [[role, f"{w / GB:.1f}", f"{a / GB:.1f}", f"{(w + a) / GB:.1f}", "yes" if w + a < 80 * GB else "NO", how]
            for role, w, a, how in gpu]
    lines = [format_table(["role (sd35m layout)", "weights + optimizer GB", "activations GB", "total GB",
                           "fits 80 GB", "how"], rows,
                          "GPU memory per role at SD3.5-Medium, bf16 (projected from the measurements below)"),
             "", format_table(["what", "size", "how"], host, "Disk, host memory and network")]
    return "\n".join(lines), summary


def measured_tables(r: dict) -> str:
    """What was measured in this run, as it was (no projection)."""
    rows = []
    for stage in ("preprocess", "drm", "rl"):
        if stage in r:
            for role, mb in r[stage]["peak_rss_mb"].items():
                rows.append([stage, role, mb])
    rss = format_table(["stage", "role", "peak RSS MB"], rows, "Peak resident memory per role (this CPU, float32, "
                       f"{r['model']['depth']} DiT blocks)")
    act = r["activations"]
    arows = [[name, act[name]["total"] / 2**20, " ".join(f"{b / 2**20:.1f}" for b in act[name]["per_block"]),
              act[name].get("fwd_bwd_s", "")] for name in ("drm_plain", "drm_ckpt", "policy_lora")]
    acts = format_table(["forward", "saved MB / sequence", "per block MB", "fwd+bwd s"], arows,
                        "Bytes autograd saves for backward, one 512 px sequence (1024 image + 333 text tokens), fp32")
    meta = r["preprocess"]["meta"]
    crow = [[meta["num_rows"], meta["num_prompts"], meta["pair_bytes"] / meta["num_rows"] / 1e3,
             meta["prompt_bytes"] / meta["num_prompts"] / 1e6, meta.get("latent_dtype", "?")]]
    cache = format_table(["pairs", "distinct prompts", "kB per pair", "MB per prompt", "latent dtype"], crow,
                         "Embedding cache written by jobs/preprocess.py")
    stage_s = r.get("stage_s", {})
    times = format_table(["stage", "wall s"], [[s, v] for s, v in stage_s.items()] + [["all", sum(stage_s.values())]],
                         "Wall time per stage of `python bench/scale.py` (start-up of Ray, Ray Train and the models "
                         "dominates)")
    return "\n\n".join([cache, acts, rss, times])


def write_doc(r: dict, path: Path) -> None:
    projected, summary = report(r)
    role, largest = summary["largest_role"]
    if summary["over_80gb"]:
        verdict = (f"NOT every role fits an 80 GB GPU at the sd35m settings: {', '.join(summary['over_80gb'])} "
                   "exceed it; lower the knobs below.")
    else:
        verdict = (f"Every role of the sd35m layout fits an 80 GB GPU at its settings (checkpointing on); the largest "
                   f"is the {role} at {largest / GB:.0f} GB.")
    measured = measured_tables(r)
    p = r["params"]
    text = f"""# Scale: what the paper's setup needs

Written by `python bench/scale.py` (the scale rehearsal) on {r['host']}, {r['date']}. It runs every stage of the
sd35m path (preprocess -> cache -> DRM training with accumulation, checkpointing and validation -> one Step-GRPO
iteration) through the real jobs on SD3.5-Medium-width components (DiT width 1536, joint attention 4096, pooled 2048,
T5-width prompt embeddings [333, 4096], latents [16, 64, 64]) with the depth reduced to {r['model']['depth']} blocks,
then projects each measured per-item cost to the paper's sizes: 24 blocks, 1.4M preference pairs, 25k RL prompts,
the sd35m layout (4 rollout workers + 1 DRM scorer + 2 learner workers; DRM training on {r['drm_workers']} GPUs).

Exact (from the published configs, built on the meta device): DiT {p['dit'] / 1e9:.2f}B parameters, DRM (21 blocks
+ head) {p['drm'] / 1e9:.2f}B, T5-XXL encoder {p['t5_xxl'] / 1e9:.2f}B, CLIP-L {p['clip_l'] / 1e6:.0f}M, CLIP-G
{p['clip_g'] / 1e6:.0f}M, VAE {p['vae'] / 1e6:.0f}M.
Measured (this run): bytes per pair and per distinct prompt in the cache, saved-for-backward bytes per sequence and
per block (with and without checkpointing), peak RSS per role, bytes through the driver and rollout payload per
iteration. Assumed (named where used): 17 pairs per distinct prompt (Pick-a-Pic: 583,747 pairs, ~35,000 prompts),
bf16 activations = half the fp32 bytes measured here, ZeRO-2's model-state arithmetic, GPU attention kernels that
save no more than the CPU's (PyTorch's CPU SDPA is a flash kernel too).

```
{projected}
```

{verdict} Knobs: `drm.micro_batch` and `drm.gradient_checkpointing` (DRM activations scale with micro-batch x 21 blocks;
without checkpointing the same micro-batch needs the row above), `drm.num_workers` (ZeRO-2 divides the fp32 optimizer
state), `learner.micro_batch_states` (learner activations scale with it), `data.latent_dtype` (bf16 halves the
latent bytes of the cache), the number of distinct prompts (the cache's prompt table and the RL prompt table grow
with distinct prompts, not pairs), `learner.state_every` (LoRA + Adam writes to shared storage every N updates).
The RL prompt table is the largest host-memory item: every node holds it once in Ray's object store (68 GB at 25k
prompts; the store defaults to 30% of RAM, so size it with `ray start --object-store-memory`), and the task that
encodes it holds it once more while storing it; fewer prompts per run, or a shorter T5 context
(`model.max_sequence_length`, which changes what the model sees), shrink it.

## Measured in the rehearsal

```
{measured}
```

## GPU check

`bench/gpu_check.py` measures the same roles on one GPU with the full 24 blocks (random init, bf16, 512 px). No GPU
was lent to the session that wrote this page; run `python bench/gpu_check.py` on a GPU machine and add its table.
"""
    path.write_text(text)


