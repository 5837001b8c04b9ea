"""Benchmark: the cost and effect of Step-wise Sampling as k grows (a benchmark, not a test).

    python bench/stepwise_cost.py --drm outputs/tiny/drm            # a trained DRM (jobs/train_drm.py)
    python bench/stepwise_cost.py                                   # trains one with jobs/train_drm.py if present
    python bench/stepwise_cost.py --untrained --ks 1,2,4,6 --seeds 4 sampling.num_steps=6
    python bench/stepwise_cost.py --config sd35m model.path=/models/sd3.5-medium --drm /ckpt/drm --prompts p.txt

For each k, the same prompts and seeds (in-process, one RewardScorer, batches of --batch-size) are denoised with
`stepwise_sample`; the table shows the wall time per image (denoising only: prompt encoding, VAE decoding and the
final scoring are outside the clock; the least of --repeats runs), its ratio to the first k (1 by default), and the ratio implied by
counting transformer blocks: per image, T policy steps of a CFG forward over n blocks on 2 latents, plus for k > 1
T - 1 DRM forwards of n - n_drop blocks on k latents:

    implied(k) = (2 n T + [k > 1] k (n - n_drop) (T - 1)) / (2 n T)

It also shows the mean DRM score of the final samples (scored at s = 0, mean +- standard error), its paired gain
over k = 1 (same prompts and seeds; mean +- standard error of the per-image difference), the mean spread (max - min)
of the k scores per step, and the diversity across seeds (drm_ray.diversity). The selector and the judge are the
same DRM here, so a rising score shows that selection works, not that images got better. The paper's anchor is
3.4x at k = 6 on SD3.5-Medium; the formula gives the SD3.5-Medium figure for comparison. On the tiny preset the
measured ratio does not follow block counts: fixed per-call costs (embeddings, the reward head, Python) dominate a
158k-parameter model, and timings on shared cores are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from drm_ray.config import load_config  # noqa: E402
from drm_ray.console import add_config_args, job_config  # noqa: E402
from drm_ray.data.prompts import load_prompts  # noqa: E402
from drm_ray.diffusion.flow import schedule_sigmas  # noqa: E402
from drm_ray.diffusion.sampling import decode_latents, denoise, initial_latents  # noqa: E402
from drm_ray.diffusion.stepwise import stepwise_sample  # noqa: E402
from drm_ray.diversity import prompt_diversity  # noqa: E402
from drm_ray.reward.model import build_drm  # noqa: E402
from drm_ray.data.prompt_table import encode_prompt_table  # noqa: E402
from drm_ray.models.sd3 import build_components, latent_size, model_kwargs  # noqa: E402
from drm_ray.sample_driver import make_batches, plan_items  # noqa: E402
from drm_ray.workers.scorer import RewardScorer  # noqa: E402

SD35M_BLOCKS = 24  # transformer blocks of Stable Diffusion 3.5-Medium


def implied_ratio(k: int, blocks: int, drm_blocks: int, steps: int, cfg_latents: int = 2) -> float:
    policy = cfg_latents * blocks * steps
    return (policy + (k * drm_blocks * (steps - 1) if k > 1 else 0)) / policy


def get_drm(args, cfg, out: Path) -> tuple[Path, str]:
    """(DRM directory, how it was obtained)."""
    if args.drm:
        return Path(args.drm), f"trained DRM from {args.drm}"
    train_job = ROOT / "jobs" / "train_drm.py"
    if not args.untrained and train_job.is_file():
        run_dir = out / "train_drm"
        print(f"[bench] no --drm given: training one with {train_job.relative_to(ROOT)} into {run_dir}", flush=True)
        cmd = [sys.executable, str(train_job), "--config", args.config, *args.overrides, f"run.output_dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0 or not (run_dir / "drm").is_dir():
            raise SystemExit(f"[bench] {' '.join(cmd)} failed (exit {proc.returncode}); pass --drm DIR or "
                             "--untrained")
        return run_dir / "drm", f"DRM trained by jobs/train_drm.py ({run_dir / 'drm'})"
    why = "--untrained" if args.untrained else "no --drm given and jobs/train_drm.py does not exist"
    print(f"[bench] {why}: building an UNTRAINED DRM; its scores are meaningless (timings still hold)", flush=True)
    comps = build_components(cfg.model.preset, **model_kwargs(cfg.model, cfg.sampling), text=False, vae=False)
    r = cfg.drm
    drm = build_drm(comps.transformer, n_drop=r.n_drop, head=r.head, head_dim=r.head_dim, init=r.init,
                    latent_size=latent_size(cfg.model.preset, cfg.sampling.resolution), seed=cfg.run.seed)
    return drm.save_pretrained(out / "untrained_drm"), "UNTRAINED DRM (scores meaningless)"


def run_k(comps, scorer, sigmas, cond, items, k: int, s, batch_size: int,
          size: int) -> tuple[float, torch.Tensor, dict]:
    """Denoise every item with k candidates: (denoising seconds, final latents [N, C, h, w], step stats)."""
    embeds, pooled, neg, neg_pooled = cond  # [P, ...] rows of the prompt table
    latents, spreads, seconds = [], [], 0.0
    for idx in make_batches(len(items), batch_size):
        gens = [torch.Generator().manual_seed(items[i].seed) for i in idx]
        x1 = initial_latents(len(idx), comps.transformer.config.in_channels, size, gens, comps.transformer.device)
        rows = torch.tensor([items[i].prompt_index for i in idx])

        def select(lat, lvl, batch_rows, rows=rows):  # the scorer names prompts by table row
            return scorer.score(lat, lvl, rows[batch_rows])

        start = time.perf_counter()
        res = stepwise_sample(comps.transformer, sigmas, embeds[rows], pooled[rows], x1, k=k,
                              noise_level=s.noise_level, generator=gens, scorer=select if k > 1 else None,
                              neg_embeds=neg[rows], neg_pooled=neg_pooled[rows], guidance_scale=s.guidance_scale)
        seconds += time.perf_counter() - start
        latents.append(res.latents)
        spreads.append(res.spread)
    return seconds, torch.cat(latents), {"spread": float(torch.cat(spreads).nanmean()) if k > 1 else float("nan")}


def run_best_of(comps, scorer, sigmas, cond, items, k: int, s, batch_size: int,
                size: int) -> tuple[float, torch.Tensor]:
    """The baseline at the same selection budget: best-of-k WHOLE images. k independent trajectories per item (the
    first from the item's own seed, so best-of-1 is plain sampling, as Step-wise Sampling with k = 1), the same DRM
    scores each final image at s = 0, the best is kept. Costs k x the policy forwards of one image (Step-wise
    Sampling spends 1 x, its k candidates per step sharing one mean) and k DRM forwards per image."""
    embeds, pooled, neg, neg_pooled = cond
    out, seconds = [], 0.0
    for idx in make_batches(len(items), batch_size):
        rows = torch.tensor([items[i].prompt_index for i in idx])
        best, best_score = None, None
        start = time.perf_counter()
        for j in range(k):
            gens = [torch.Generator().manual_seed(items[i].seed + 1_000_003 * j) for i in idx]
            x1 = initial_latents(len(idx), comps.transformer.config.in_channels, size, gens, comps.transformer.device)
            lat = denoise(comps.transformer, sigmas, embeds[rows], pooled[rows], neg[rows], neg_pooled[rows],
                          s.guidance_scale, s.noise_level, x1, gens)
            score = scorer.score(lat, torch.zeros(len(idx)), rows)  # [B]
            if best is None:
                best, best_score = lat.clone(), score
            else:
                better = score > best_score
                best[better] = lat[better]
                best_score = torch.maximum(best_score, score)
        seconds += time.perf_counter() - start
        out.append(best)
    return seconds, torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--drm", default=None, help="a trained DRM directory")
    parser.add_argument("--untrained", action="store_true", help="use an untrained DRM (timings only)")
    parser.add_argument("--ks", default="1,2,4,6", help="comma-separated k values (default 1,2,4,6)")
    parser.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    parser.add_argument("--num-prompts", type=int, default=8, help="first N prompts (default 8)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt, for the diversity (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per k; the least is reported")
    parser.add_argument("--out", default=None, help="work directory (default <run.output_dir>/bench_stepwise)")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    parser.add_argument("--best-of", action="store_true",
                        help="also run best-of-k whole images with the same DRM (k x the policy forwards)")
    args = parser.parse_intermixed_args(argv)
    ks = [int(v) for v in args.ks.split(",")]
    if min(ks) < 1 or args.num_prompts < 1 or args.seeds < 2 or args.repeats < 1:
        parser.error("--ks must be >= 1, --num-prompts >= 1, --seeds >= 2 (diversity needs pairs), --repeats >= 1")
    cfg = job_config(args)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    s = cfg.sampling
    out = Path(args.out or Path(cfg.run.output_dir) / "bench_stepwise")
    out.mkdir(parents=True, exist_ok=True)
    drm_dir, drm_note = get_drm(args, cfg, out)

    comps = build_components(cfg.model.preset, **model_kwargs(cfg.model, s))
    prompts = load_prompts(args.prompts, cfg.model.preset)[:args.num_prompts]
    prompt_table = encode_prompt_table(prompts, s.negative_prompt, cfg.model.preset, model_kwargs(cfg.model, s))
    scorer = RewardScorer(["drm"], prompt_table, preset=cfg.model.preset, drm_path=str(drm_dir), dtype=cfg.model.dtype)
    scorer.check_compatible(dict(comps.transformer.config), latent_size(cfg.model.preset, s.resolution))
    items = plan_items(prompts, args.seeds, cfg.run.seed)
    sigmas = schedule_sigmas(comps.scheduler, s.num_steps)
    cond = prompt_table.rows(list(range(len(prompts))), comps.transformer.device)  # as the sample job's sampler
    rows_all = torch.tensor([it.prompt_index for it in items])
    n_blocks, n_drm = comps.transformer.config.num_layers, len(scorer.rewards.drms()[0].drm.blocks)
    cfg_latents = 2 if s.guidance_scale > 1 else 1

    size = latent_size(cfg.model.preset, s.resolution)
    run_k(comps, scorer, sigmas, cond, items[:2], max(ks), s, args.batch_size, size)  # warm-up
    table, best_of, first, first_oracle = [], [], None, None
    for k in ks:
        times = []
        for _ in range(args.repeats):
            seconds, latents, stats = run_k(comps, scorer, sigmas, cond, items, k, s, args.batch_size, size)
            times.append(seconds)
        final = scorer.score(latents, torch.zeros(len(items)), rows_all)  # [N]
        first = final if first is None else first
        gain = final - first                                                 # [N], paired with the first k
        images = torch.cat([decode_latents(comps.vae, latents[lo:lo + 16]) for lo in range(0, len(items), 16)])
        div = prompt_diversity(images, [it.prompt_index for it in items])
        captions = [prompts[it.prompt_index] for it in items]
        row, graded = oracle_columns(cfg.model.preset, images, captions, first_oracle)
        first_oracle = graded if first_oracle is None else first_oracle
        row.update(k=k, t=min(times) / len(items), implied=implied_ratio(k, n_blocks, n_drm, s.num_steps, cfg_latents),
                   score=float(final.mean()), sem=float(final.std() / len(final) ** 0.5),
                   gain=float(gain.mean()), gain_sem=float(gain.std() / len(gain) ** 0.5),
                   spread=stats["spread"], rms=div["diversity/pairwise_rms"], dssim=div["diversity/one_minus_ssim"])
        row.update(policy_forwards=s.num_steps, drm_forwards=(k * (s.num_steps - 1) if k > 1 else 0) + 1)
        table.append(row)
        if args.best_of:
            seconds, latents = run_best_of(comps, scorer, sigmas, cond, items, k, s, args.batch_size, size)
            final = scorer.score(latents, torch.zeros(len(items)), rows_all)
            images = torch.cat([decode_latents(comps.vae, latents[lo:lo + 16]) for lo in range(0, len(items), 16)])
            row, _ = oracle_columns(cfg.model.preset, images, captions, first_oracle)
            gain = final - first
            row.update(k=k, t=seconds / len(items), score=float(final.mean()),
                       sem=float(final.std() / len(final) ** 0.5), gain=float(gain.mean()),
                       gain_sem=float(gain.std() / len(gain) ** 0.5), policy_forwards=k * s.num_steps,
                       drm_forwards=k)
            best_of.append(row)
    print_table(table, cfg, args, drm_note, n_blocks, n_drm, len(items))
    if best_of:
        print("\nbest-of-k whole images (same DRM at s = 0, k x the policy forwards):")
        for r in best_of:
            print(f"{r['k']:>3} | {r['t']:>9.4f} s/image | DRM {r['score']:+.4f} | "
                  f"policy forwards {r['policy_forwards']}"
                  + (f" | oracle {r['oracle']:.4f} +- {r['oracle_sem']:.4f}, gain {r['oracle_gain']:+.4f} +- "
                     f"{r['oracle_gain_sem']:.4f}" if "oracle" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"drm": drm_note, "images": len(items), "rows": table,
                                               "best_of": best_of}, indent=2))


def oracle_columns(preset: str, images: torch.Tensor, captions: list[str],
                   first: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """The toy world's hidden oracle on the final images: (mean +- s.e., paired gain over the first k's grades
    `first`, % correct; these grades [N]). Other presets have no oracle: ({}, None)."""
    if preset != "toy":
        return {}, None
    from drm_ray.toy.oracle import oracle_scores

    result = oracle_scores(images, captions)
    graded = torch.from_numpy(result.score)
    gain = graded - (first if first is not None else graded)
    return dict(oracle=float(graded.mean()), oracle_sem=float(graded.std() / len(graded) ** 0.5),
                oracle_gain=float(gain.mean()), oracle_gain_sem=float(gain.std() / len(gain) ** 0.5),
                oracle_correct=float(result.correct.mean())), graded


def print_table(table, cfg, args, drm_note, n_blocks, n_drm, n_items) -> None:
    s = cfg.sampling
    base = table[0]["t"]
    print(f"\nStep-wise Sampling cost, preset {args.config} ({cfg.model.dtype}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} thread(s)); {drm_note}")
    print(f"{n_items} images = {n_items // args.seeds} prompts x {args.seeds} seeds, {s.num_steps} steps, "
          f"CFG {s.guidance_scale}, noise level {s.noise_level}, batch {args.batch_size}, best of {args.repeats}; "
          f"policy {n_blocks} blocks, DRM {n_drm} blocks")
    k0 = table[0]["k"]
    print(f"{'k':>3} | {'s/image':>9} | {'measured':>8} | {'implied':>7} | {'DRM score (final, s=0)':>22} | "
          f"{f'gain vs k={k0} (paired)':>22} | {'step spread':>11} | {'pairwise RMS':>12} | {'1 - SSIM':>8}")
    print("-" * 125)
    for r in table:
        print(f"{r['k']:>3} | {r['t']:>9.4f} | {r['t'] / base:>7.2f}x | {r['implied']:>6.2f}x | "
              f"{r['score']:>+13.4f} +- {r['sem']:.4f} | {r['gain']:>+13.4f} +- {r['gain_sem']:.4f} | "
              f"{r['spread']:>11.4f} | {r['rms']:>12.4f} | {r['dssim']:>8.4f}")
    if "oracle" in table[0]:
        print(f"\ntoy-world oracle (independent of the DRM) on the same images:\n{'k':>3} | {'oracle':>17} | "
              f"{f'gain vs k={k0} (paired)':>22} | {'correct':>7}")
        for r in table:
            print(f"{r['k']:>3} | {r['oracle']:>8.4f} +- {r['oracle_sem']:.4f} | {r['oracle_gain']:>+13.4f} +- "
                  f"{r['oracle_gain_sem']:.4f} | {100 * r['oracle_correct']:>6.1f}%")
    sd35m_steps = load_config("sd35m").sampling.num_steps
    ratio = implied_ratio(6, SD35M_BLOCKS, SD35M_BLOCKS - cfg.drm.n_drop, sd35m_steps)
    print(f"implied for SD3.5-Medium ({SD35M_BLOCKS} blocks, DRM {SD35M_BLOCKS - cfg.drm.n_drop}, "
          f"{sd35m_steps} steps, CFG) at k = 6: {ratio:.2f}x; the paper measured 3.4x")


if __name__ == "__main__":
    main()
