"""Encode a preference Parquet once into the embedding cache (`drm_ray.data.cache`), with Ray Data.

    stats = preprocess_pairs("pairs.parquet", "cache/", preset="tiny",
                             model_kwargs=model_kwargs(cfg.model, cfg.sampling), concurrency=1, num_gpus=0)

The input is validated on the driver first (`PreferenceReader`), so a missing, empty, corrupt or mis-typed file, or a
blank prompt, fails before any Ray work. The dataset is built from the file's row groups (path, row group, first row)
rather than with `ray.data.read_parquet`, so every row keeps its row number and an undecodable image is reported as
"file, row, column"; parallelism is therefore over row groups (`write_preference_parquet` writes one per 256 pairs).
Encoder actors (`PairEncoder`, one model copy each, `num_gpus` per actor) decode both images, VAE-encode them and
encode the prompt; the driver streams the results into shards. The cache is assembled in a hidden sibling directory
and renamed into place after `meta.json` (written last), so a failure never leaves a partial cache under
`cache_dir`. Besides the cache format it writes `preprocess.json` (what the cache was built from; readers ignore it).
Winners get label 1.0, ties 0.5. On a multi-node cluster the Parquet file and the cache directory must be on storage
every node sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from drm_ray.data.cache import CacheError, PairBatch, pair_rows, read_meta, write_meta, write_shard
from drm_ray.data.preferences import SCHEMA, PreferenceDataError, PreferenceReader, decode_pairs, read_row_group
from drm_ray.data.synthetic import write_synthetic_parquet
from drm_ray.diffusion.sampling import encode_images
from drm_ray.models.sd3 import build_components, default_device, encode_prompts, latent_size

log = logging.getLogger(__name__)

TIE_LABEL, WIN_LABEL = 0.5, 1.0
SIDECAR = "preprocess.json"


@dataclass
class PreprocessStats:
    pairs: str                   # the input file
    rows_in: int
    rows_written: int = 0
    ties: int = 0
    skipped_rows: list[int] = field(default_factory=list)   # undecodable images (on_bad_image="skip")
    synthetic: dict | None = None  # n, seed, resolution, tie_fraction when built by ensure_synthetic_cache


def read_units(batch: dict[str, np.ndarray], columns: list[str]) -> pa.Table:
    """Ray Data stage: work units (path, row group, first row) -> their rows, numbered, with defaults filled in."""
    tables = []
    for path, group, first in zip(batch["path"], batch["group"], batch["first_row"]):
        table = read_row_group(str(path), int(group), columns=columns)
        n = table.num_rows
        for name, value, dtype in (("source", "", pa.string()), ("tie", False, pa.bool_())):
            filled = pc.fill_null(table[name], value) if name in columns else pa.array([value] * n, dtype)
            table = table.drop_columns([name]) if name in columns else table
            table = table.append_column(name, filled)
        table = table.append_column("row_index", pa.array(np.arange(first, first + n), pa.int64()))
        tables.append(table.select(["row_index", *SCHEMA.names]))
    return pa.concat_tables(tables)


class PairEncoder:
    """Ray Data stage, one per actor: images -> VAE latents, prompts -> SD3 text embeddings. Builds the model once.

    An image that does not decode is not raised here (Ray would bury the message in its own traceback): its row
    comes back with zero tensors and the reason in `error`, and the driver applies `on_bad_image`.
    """

    def __init__(self, path: str, preset: str, model_kwargs: dict):
        self.path, self.preset = path, preset
        self.resolution = model_kwargs["resolution"]
        self.max_sequence_length = model_kwargs["max_sequence_length"]
        # The device comes from torch, never from Ray's GPU ids (which are fake on CPU test clusters).
        self.comps = build_components(preset, text=True, vae=True, device=default_device(), **model_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["row_index"].tolist()
        win, lose, kept, skipped = decode_pairs(self.path, rows, batch["image_win"], batch["image_lose"],
                                                self.resolution, on_bad_image="skip")  # [B', 3, R, R] each
        prompts = [str(p) for p in batch["prompt"]]
        embeds, pooled = encode_prompts(self.comps, prompts, self.max_sequence_length)  # [B, L, D], [B, P]
        latent = latent_size(self.preset, self.resolution)
        latent_win = torch.zeros(len(rows), self.comps.vae.config.latent_channels, latent, latent)  # [B, C, h, w]
        latent_lose = torch.zeros_like(latent_win)  # rows in `skipped` stay zero
        if kept:
            position = {r: i for i, r in enumerate(rows)}
            good = [position[r] for r in kept]
            latents = encode_images(self.comps.vae, torch.cat([win, lose])).cpu()  # [2B', C, h, w] float32
            latent_win[good], latent_lose[good] = latents[:len(kept)], latents[len(kept):]
        return {
            "row_index": batch["row_index"], "prompt": batch["prompt"], "source": batch["source"],
            "label": np.where(batch["tie"].astype(bool), TIE_LABEL, WIN_LABEL).astype(np.float32),  # [B]
            "error": np.asarray([skipped.get(r, "") for r in rows], dtype=object),
            "latent_win": latent_win.numpy(), "latent_lose": latent_lose.numpy(),
            # float16 is what the cache stores: halves the object-store traffic
            "prompt_embeds": embeds.float().cpu().numpy().astype(np.float16),  # [B, L, D]
            "pooled": pooled.float().cpu().numpy().astype(np.float16),  # [B, P]
        }


# ---------------------------------------------------------------------------------------------- driver


def preprocess_pairs(pairs: str | Path, cache_dir: str | Path, *, preset: str, model_kwargs: dict,
                     concurrency: int = 1, num_gpus: float = 0.0, batch_size: int = 16, shard_rows: int = 256,
                     on_bad_image: str = "error", overwrite: bool = False,
                     synthetic: dict | None = None) -> PreprocessStats:
    """Encode every pair of `pairs` into a cache at `cache_dir`; returns what was written and skipped.

    `model_kwargs` are `build_components` arguments (`drm_ray.models.sd3.model_kwargs(cfg.model, cfg.sampling)`);
    `resolution` and `max_sequence_length` must be among them. `concurrency` encoder actors, each with `num_gpus`
    GPUs (1 on GPU clusters, 0 on CPU), take `batch_size` pairs per call; shards hold `shard_rows` pairs (SD3.5 rows
    are about 3 MB, tiny rows about 22 kB).
    """
    reader = PreferenceReader(pairs, on_bad_image)  # fails on a bad file before any Ray work
    reader.check_prompts()
    missing = [k for k in ("resolution", "max_sequence_length") if k not in model_kwargs]
    if missing:
        raise ValueError(f"model_kwargs lacks {missing}; build it with drm_ray.models.sd3.model_kwargs(...)")
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size), ("shard_rows", shard_rows)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    cache_dir = Path(cache_dir)
    _check_target(cache_dir, overwrite)
    if reader.file.num_row_groups < concurrency:  # a row group is one block, encoded by one actor
        log.warning("%s has %d row group(s) for %d encoder actors: rewrite it with write_preference_parquet (one row "
                    "group per 256 pairs) to use them all", pairs, reader.file.num_row_groups, concurrency)
    init_ray()
    stats = PreprocessStats(pairs=str(pairs), rows_in=reader.num_rows, synthetic=synthetic)
    ds = _encoded_dataset(reader, preset, model_kwargs, concurrency, num_gpus, batch_size)
    tmp = cache_dir.with_name(f".{cache_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shapes = _write_shards(ds, tmp, shard_rows, on_bad_image, stats)
        if stats.rows_written == 0:
            raise PreferenceDataError(f"{pairs}: all {stats.rows_in} rows were skipped (undecodable images); "
                                      f"no cache written")
        (tmp / SIDECAR).write_text(json.dumps(asdict(stats), indent=2))
        write_meta(tmp, *shapes, model={"preset": preset, **model_kwargs})
        if cache_dir.exists():  # `_check_target` allowed it: empty, or a complete cache with overwrite=True
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stats.skipped_rows:
        log.warning("%s: skipped %d of %d rows with undecodable images (first rows: %s)", pairs,
                    len(stats.skipped_rows), stats.rows_in, stats.skipped_rows[:10])
    return stats


def _encoded_dataset(reader: PreferenceReader, preset: str, model_kwargs: dict, concurrency: int, num_gpus: float,
                     batch_size: int):
    """Row groups -> numbered rows -> encoder actors; lazy until iterated."""
    path = str(reader.path.resolve())
    columns = [c for c in SCHEMA.names if c in reader.file.schema_arrow.names]
    units = [{"path": path, "group": g, "first_row": first} for g, first, _ in reader.row_groups()]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds.context.execution_options.preserve_order = True  # shards follow the input order: a reproducible cache
    ds = ds.map_batches(read_units, batch_size=1, fn_kwargs={"columns": columns}, batch_format="numpy")
    return ds.map_batches(PairEncoder, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                          num_gpus=num_gpus, batch_format="numpy",
                          fn_constructor_kwargs=dict(path=str(reader.path), preset=preset, model_kwargs=model_kwargs))


def _write_shards(ds, out: Path, shard_rows: int, on_bad_image: str, stats: PreprocessStats) -> tuple[list, ...]:
    """Stream encoded rows into shards, applying `on_bad_image`; returns (latent, embed, pooled) shapes."""
    out.mkdir(parents=True)
    shapes, index = None, 0
    for b in ds.iter_batches(batch_size=shard_rows, batch_format="numpy"):
        bad = b["error"] != ""
        if bad.any() and on_bad_image == "error":
            raise PreferenceDataError(b["error"][bad][0])
        stats.skipped_rows += b["row_index"][bad].tolist()
        good = np.flatnonzero(~bad)
        if len(good) == 0:
            continue
        pairs = PairBatch(*(torch.from_numpy(b[k][good]) for k in
                            ("latent_win", "latent_lose", "prompt_embeds", "pooled", "label")),
                          prompt=b["prompt"][good].tolist())
        write_shard(out, index, pair_rows(pairs, source=b["source"][good].tolist()))
        index += 1
        stats.rows_written += len(good)
        stats.ties += int((pairs.label == TIE_LABEL).sum())
        shapes = (list(pairs.latent_win.shape[1:]), list(pairs.prompt_embeds.shape[1:]), list(pairs.pooled.shape[1:]))
    return shapes


def _check_target(cache_dir: Path, overwrite: bool) -> None:
    if not cache_dir.exists() or (cache_dir.is_dir() and not any(cache_dir.iterdir())):
        return
    if (cache_dir / "meta.json").is_file():
        if overwrite:
            return
        raise CacheError(f"{cache_dir} already holds a complete cache; pass overwrite=True (--overwrite) to "
                         f"replace it")
    raise CacheError(f"{cache_dir} exists and is not an embedding cache (no meta.json); refusing to write into it")


def init_ray() -> None:
    from drm_ray.runtime import init_ray as join_or_start

    join_or_start()


def ensure_synthetic_cache(cache_dir: str | Path, n: int = 512, seed: int = 0, *, preset: str = "tiny",
                           model_kwargs: dict, tie_fraction: float = 0.0, concurrency: int = 1,
                           num_gpus: float = 0.0, batch_size: int = 16, shard_rows: int = 256) -> Path:
    """The cache of the built-in synthetic set (`drm_ray.data.synthetic`) at `cache_dir`, built unless present.

    A present cache must have been built from the same set (n, seed, resolution, tie_fraction) and model, else
    `CacheError`: a stale cache is never silently reused. The synthetic Parquet is written next to `cache_dir` (so
    every node of a cluster whose output directory is shared can read it) and removed afterwards.
    """
    cache_dir = Path(cache_dir)
    synthetic = {"n": n, "seed": seed, "resolution": model_kwargs["resolution"], "tie_fraction": tie_fraction}
    if (cache_dir / "meta.json").is_file():
        _check_same_cache(cache_dir, {"preset": preset, **model_kwargs}, synthetic)
        return cache_dir
    work = cache_dir.with_name(f".{cache_dir.name}.pairs-{os.getpid()}")
    try:
        pairs = work / "pairs.parquet"
        write_synthetic_parquet(pairs, n, synthetic["resolution"], seed, tie_fraction)
        preprocess_pairs(pairs, cache_dir, preset=preset, model_kwargs=model_kwargs, concurrency=concurrency,
                         num_gpus=num_gpus, batch_size=batch_size, shard_rows=shard_rows, synthetic=synthetic)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache_dir


def _check_same_cache(cache_dir: Path, model: dict, synthetic: dict) -> None:
    meta = read_meta(cache_dir)
    sidecar = cache_dir / SIDECAR
    built_from = json.loads(sidecar.read_text()).get("synthetic") if sidecar.is_file() else None
    # JSON turns tuples into lists: compare through the same round trip
    want = json.loads(json.dumps({"model": model, "synthetic": synthetic}))
    have = {"model": meta.get("model") or {}, "synthetic": built_from or {}}
    diff = [f"{sec}.{k}: cache has {have[sec].get(k)!r}, wanted {want[sec].get(k)!r}"
            for sec in want for k in sorted(set(want[sec]) | set(have[sec])) if have[sec].get(k) != want[sec].get(k)]
    if diff:
        raise CacheError(f"{cache_dir} holds a different cache ({'; '.join(diff)}); delete it or choose another "
                         f"cache directory")


def cache_dir_for(pairs: str | Path, root: str | Path, preset: str, model_kwargs: dict) -> Path:
    """A cache location keyed by the input file (path, size, mtime) and the encoding model, so a job never reuses
    a cache built from another file or model."""
    import hashlib

    stat = Path(pairs).stat()
    key = json.dumps([str(Path(pairs).resolve()), stat.st_size, stat.st_mtime_ns, preset, model_kwargs],
                     sort_keys=True, default=str)
    return Path(root) / f"{Path(pairs).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
