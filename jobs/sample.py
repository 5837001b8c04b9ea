"""Sample images from an SD3 model (ODE by default, SDE with sampling.noise_level > 0).

    python jobs/sample.py                                   # tiny preset, built-in prompts, CPU, seconds
    python jobs/sample.py --prompts prompts.txt --out outputs/samples sampling.num_steps=8
    python jobs/sample.py --config sd35m model.path=/models/sd3.5-medium --prompts prompts.txt

Writes one PNG per prompt and `metadata.parquet` (prompt, seed, file, num_steps, guidance_scale, noise_level) into
`--out`. Each prompt's seed is `run.seed + index`, drawn from its own generator, so an image does not depend on the
batch it was sampled in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from drm_ray.config import add_config_args, load_config  # noqa: E402
from drm_ray.data.prompts import load_prompts  # noqa: E402
from drm_ray.diffusion.flow import schedule_sigmas  # noqa: E402
from drm_ray.diffusion.sampling import decode_latents, denoise, initial_latents, to_pil  # noqa: E402
from drm_ray.models.sd3 import build_components, encode_prompts, model_kwargs  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--prompts", default=None, help="a .txt or .parquet prompt file (default: built-in set)")
    parser.add_argument("--out", default=None, help="output directory (default: <run.output_dir>/samples)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = cfg.sampling

    prompts = load_prompts(args.prompts)
    out = Path(args.out or Path(cfg.run.output_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    comps = build_components(cfg.model.preset, **model_kwargs(cfg.model, s))
    device = comps.transformer.device
    sigmas = schedule_sigmas(comps.scheduler, s.num_steps)
    neg, neg_pooled = encode_prompts(comps, [s.negative_prompt], cfg.model.max_sequence_length)

    rows, start = [], time.perf_counter()
    for lo in range(0, len(prompts), args.batch_size):
        batch = prompts[lo:lo + args.batch_size]
        seeds = [cfg.run.seed + lo + j for j in range(len(batch))]
        gens = [torch.Generator().manual_seed(sd) for sd in seeds]
        embeds, pooled = encode_prompts(comps, batch, cfg.model.max_sequence_length)
        x1 = initial_latents(len(batch), comps.transformer.config.in_channels, s.resolution // 8, gens, device)
        latents = denoise(comps.transformer, sigmas, embeds, pooled, neg.expand(len(batch), -1, -1),
                          neg_pooled.expand(len(batch), -1), s.guidance_scale, s.noise_level, x1, gens)
        for j, image in enumerate(to_pil(decode_latents(comps.vae, latents))):
            name = f"{lo + j:05d}.png"
            image.save(out / name)
            rows.append(dict(prompt=batch[j], seed=seeds[j], file=name, num_steps=s.num_steps,
                             guidance_scale=s.guidance_scale, noise_level=s.noise_level))
    pq.write_table(pa.Table.from_pylist(rows), out / "metadata.parquet")
    print(f"wrote {len(rows)} images to {out} in {time.perf_counter() - start:.1f}s")
    return out


if __name__ == "__main__":
    main()
