"""Encode preference Parquet files once into the embedding cache (`drm_ray.data.cache`), with Ray actors.

    stats = preprocess_pairs("pairs/", "cache/", preset="tiny", model_kwargs=model_kwargs(cfg.model, cfg.sampling),
                             **encoder_options(cfg.data))

`pairs` is a file, a directory (every *.parquet in it, sorted) or a glob. Every file is validated on the driver first
(`PreferenceReader`: container, schema, and the prompt column), so a missing, empty, corrupt or mis-typed file, or a
blank prompt, fails naming file, row and column before any Ray work. Then `concurrency` encoder actors
(`PairEncoder`, one model copy and `num_gpus` GPUs each; the cluster's capacity is checked with
`drm_ray.placement.ensure_resources` before they are created, so an impossible GPU demand fails at once) run two
passes, and write the cache files themselves:

1. prompts: the driver reads the prompt columns only, deduplicates them (first occurrence order) and deals parts of
   `shard_rows` distinct prompts to the actors; each prompt is text-encoded once, into prompt part `<k>`.
2. pairs: one unit of work per (input file, row group); the actor decodes both images of `batch_size` pairs at a
   time, VAE-encodes them and writes pair shards of `shard_rows` pairs named `<file>-<row group>-<k>`.

Names come from the input, never from which actor ran the work, so a cache is reproducible. The driver receives only
small summaries (rows written, ties, skipped rows, shapes, bytes), never rows or tensors: its memory and network do
not grow with the data. The cache is assembled in a hidden sibling directory and renamed into place after
`meta.json` (written last), so a failure never leaves a partial cache under `cache_dir` and never touches a complete
one. `preprocess.json` records what the cache was built from (readers ignore it). Winners get label 1.0 (or the
file's soft `label`), ties 0.5.
On a multi-node cluster the input files and the cache directory must be on storage every node sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray
import torch
from ray.util import ActorPool

from drm_ray.data.cache import (LATENT_DTYPES, PROMPTS, CacheError, pair_columns, read_meta, write_meta,
                                write_prompt_part, write_shard)
from drm_ray.data.preferences import (OPTIONAL_COLUMNS, PreferenceDataError, PreferenceReader, decode_pairs,
                                      pair_labels, preference_files, read_row_group)
from drm_ray.data.synthetic import write_synthetic_parquet
from drm_ray.placement import ClusterResourcesError, RoleDemand, ensure_resources

log = logging.getLogger(__name__)

TIE_LABEL = 0.5
SIDECAR = "preprocess.json"
ENCODER_CPUS = 1.0  # per encoder actor: image decoding and, without a GPU, the encoders themselves


@dataclass
class PreprocessStats:
    pairs: list[str]             # the input files, in order
    rows_in: int
    rows_written: int = 0
    ties: int = 0
    prompts: int = 0             # distinct prompts, each text-encoded once
    skipped_rows: list[int] = field(default_factory=list)   # undecodable images (on_bad_image="skip"): row numbers
    #                              over the inputs in order (file 0's rows first; with one file, the file's rows)
    synthetic: dict | None = None  # n, seed, resolution, tie_fraction when built by ensure_synthetic_cache
    seconds: dict = field(default_factory=dict)  # prompts (pass 1, with the actors' start), pairs (pass 2)


@dataclass
class PartSummary:
    """What an encoder actor reports for one prompt part."""
    name: str
    prompts: int
    embed_shape: list[int]
    pooled_shape: list[int]
    bytes: int


@dataclass
class ShardSummary:
    """What an encoder actor reports for one unit of pairs (one input row group): the shards it wrote."""
    unit: str
    shards: list[str] = field(default_factory=list)
    rows_written: int = 0
    ties: int = 0
    skipped_rows: list[int] = field(default_factory=list)   # rows of the input file
    first_skip_reason: str | None = None
    latent_shape: list[int] | None = None
    bytes: int = 0
    error: str | None = None     # on_bad_image="error": the first undecodable image (the driver fails)


def encoder_options(data, autoscale_wait_s: float = 0.0) -> dict:
    """`preprocess_pairs` / `ensure_synthetic_cache` keyword arguments from the config's data section (and
    rollout.autoscale_wait_s: how long to wait for an autoscaler to add the encoders' nodes)."""
    return dict(concurrency=data.encoder_workers, num_gpus=data.encoder_gpus, batch_size=data.encoder_batch_size,
                shard_rows=data.shard_rows, latent_dtype=data.latent_dtype, autoscale_wait_s=autoscale_wait_s)


class PairEncoder:
    """One per Ray actor: prompts -> SD3 text embeddings, image pairs -> VAE latents, written into the cache at `out`.

    Builds the model once. An image that does not decode is not raised here (Ray would bury the message in its own
    traceback): it comes back in the summary, and the driver applies `on_bad_image`.
    """

    def __init__(self, out: str, preset: str, model_kwargs: dict, latent_dtype: str, batch_size: int,
                 shard_rows: int, on_bad_image: str):
        from drm_ray.models.sd3 import build_components, default_device

        self.out, self.latent_dtype, self.on_bad_image = Path(out), latent_dtype, on_bad_image
        self.batch_size, self.shard_rows = batch_size, shard_rows
        self.resolution = model_kwargs["resolution"]
        self.max_sequence_length = model_kwargs["max_sequence_length"]
        # The device comes from torch, never from Ray's GPU ids (which are fake on CPU test clusters).
        self.comps = build_components(preset, text=True, vae=True, device=default_device(), **model_kwargs)

    def encode_prompt_part(self, name: str, prompts: list[str]) -> PartSummary:
        from drm_ray.models.sd3 import encode_prompts

        embeds = pooled = None
        for lo in range(0, len(prompts), self.batch_size):
            e, p = encode_prompts(self.comps, prompts[lo:lo + self.batch_size], self.max_sequence_length)
            if embeds is None:  # float16, filled in place: one copy of the part in host memory (2.7 MB per prompt)
                embeds = np.empty((len(prompts), *e.shape[1:]), dtype=np.float16)  # [n, L, D]
                pooled = np.empty((len(prompts), *p.shape[1:]), dtype=np.float16)  # [n, P]
            embeds[lo:lo + len(e)] = e.to("cpu", torch.float16).numpy()
            pooled[lo:lo + len(p)] = p.to("cpu", torch.float16).numpy()
        size = write_prompt_part(self.out, name, prompts, embeds, pooled)
        return PartSummary(name, len(prompts), list(embeds.shape[1:]), list(pooled.shape[1:]), size)

    def encode_pairs(self, unit: dict) -> ShardSummary:
        """Encode one input row group into shards `<unit>-<k>` of at most `shard_rows` pairs."""
        from drm_ray.diffusion.sampling import encode_images

        path, summary = unit["path"], ShardSummary(unit["name"])
        try:
            table = read_row_group(path, unit["group"], columns=unit["columns"])
        except PreferenceDataError as err:
            summary.error = str(err)
            return summary
        n, first = table.num_rows, unit["first_row"]
        source = pc.fill_null(table["source"], "").to_pylist() if "source" in unit["columns"] else [""] * n
        try:
            labels = pair_labels(path, range(first, first + n), table["tie"].to_pylist() if "tie" in unit["columns"]
                                 else None, table["label"].to_pylist() if "label" in unit["columns"] else None)
        except PreferenceDataError as err:
            summary.error = str(err)
            return summary
        pending: list[tuple] = []  # (prompt, source, label, latent_win [C, h, w], latent_lose)
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            win, lose, kept, skipped = decode_pairs(path, range(first + lo, first + hi),
                                                    table["image_win"][lo:hi].to_pylist(),
                                                    table["image_lose"][lo:hi].to_pylist(), self.resolution,
                                                    on_bad_image="skip")  # [B', 3, R, R] each
            if skipped:
                if self.on_bad_image == "error":
                    return ShardSummary(unit["name"], error=next(iter(skipped.values())))
                summary.skipped_rows += list(skipped)
                summary.first_skip_reason = summary.first_skip_reason or next(iter(skipped.values()))
            if not kept:
                continue
            latents = encode_images(self.comps.vae, torch.cat([win, lose])).cpu()  # [2B', C, h, w] float32
            summary.latent_shape = list(latents.shape[1:])
            for j, row in enumerate(kept):
                i = row - first
                pending.append((table["prompt"][i].as_py(), source[i], labels[i], latents[j], latents[len(kept) + j]))
            while len(pending) >= self.shard_rows:
                self._flush(summary, pending[:self.shard_rows])
                pending = pending[self.shard_rows:]
        if pending:
            self._flush(summary, pending)
        return summary

    def _flush(self, summary: ShardSummary, rows: list[tuple]) -> None:
        name = f"{summary.unit}-{len(summary.shards):04d}"
        prompts, source, label, win, lose = zip(*rows)
        cols = pair_columns(list(prompts), list(source), label, torch.stack(win), torch.stack(lose),
                            self.latent_dtype)
        summary.bytes += write_shard(self.out, name, cols).stat().st_size
        summary.shards.append(name)
        summary.rows_written += len(rows)
        summary.ties += sum(x == TIE_LABEL for x in label)


# ---------------------------------------------------------------------------------------------- driver


def preprocess_pairs(pairs: str | Path, cache_dir: str | Path, *, preset: str, model_kwargs: dict,
                     concurrency: int = 1, num_gpus: float = 0.0, batch_size: int = 16, shard_rows: int = 256,
                     latent_dtype: str = "float32", on_bad_image: str = "error", overwrite: bool = False,
                     autoscale_wait_s: float = 0.0, synthetic: dict | None = None) -> PreprocessStats:
    """Encode every pair of `pairs` (file, directory or glob) into a cache at `cache_dir`; returns what was written
    and skipped.

    `model_kwargs` are `build_components` arguments (`drm_ray.models.sd3.model_kwargs(cfg.model, cfg.sampling)`);
    `resolution` and `max_sequence_length` must be among them. The other settings come from the config's data
    section through `encoder_options`: `concurrency` encoder actors with `num_gpus` GPUs each take `batch_size` pairs
    (or prompts) per call; shards hold `shard_rows` pairs and prompt parts `shard_rows` prompts; latents are stored
    in `latent_dtype`.
    """
    readers = [PreferenceReader(f, on_bad_image) for f in preference_files(pairs)]  # fail before any Ray work
    distinct = list(dict.fromkeys(p for r in readers for p in r.iter_prompts()))  # checks every prompt too
    missing = [k for k in ("resolution", "max_sequence_length") if k not in model_kwargs]
    if missing:
        raise ValueError(f"model_kwargs lacks {missing}; build it with drm_ray.models.sd3.model_kwargs(...)")
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size), ("shard_rows", shard_rows)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {sorted(LATENT_DTYPES)}, got {latent_dtype!r}")
    cache_dir = Path(cache_dir)
    _check_target(cache_dir, overwrite)
    units = _pair_units(readers)
    if len(units) < concurrency:  # a row group is one unit, encoded by one actor
        log.warning("%d row group(s) for %d encoder actors: rewrite the input with write_preference_parquet (one row "
                    "group per 256 pairs) to use them all", len(units), concurrency)
    init_ray()
    bundle = {k: v for k, v in (("CPU", ENCODER_CPUS), ("GPU", float(num_gpus))) if v}
    try:
        ensure_resources([RoleDemand("encoder actors", concurrency, bundle)], autoscale_wait_s)
    except ClusterResourcesError as err:
        raise ClusterResourcesError(f"preprocessing: {err}\nFor preprocessing, change data.encoder_workers / "
                                    f"data.encoder_gpus (jobs/preprocess.py: --concurrency / --num-gpus).") from err

    stats = PreprocessStats(pairs=[str(r.path) for r in readers], rows_in=sum(r.num_rows for r in readers),
                            prompts=len(distinct), synthetic=synthetic)
    tmp = cache_dir.with_name(f".{cache_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / PROMPTS).mkdir(parents=True)
    encoder = ray.remote(num_cpus=ENCODER_CPUS, num_gpus=num_gpus)(PairEncoder)
    actors = [encoder.remote(str(tmp), preset, model_kwargs, latent_dtype, batch_size, shard_rows, on_bad_image)
              for _ in range(concurrency)]
    try:
        parts = [(f"{k:05d}", distinct[lo:lo + shard_rows]) for k, lo in enumerate(range(0, len(distinct), shard_rows))]
        start = time.perf_counter()
        part_summaries = _run(actors, "encode_prompt_part", parts)
        stats.seconds["prompts"] = round(time.perf_counter() - start, 2)
        shapes = _apply(stats, _run(actors, "encode_pairs", [(u,) for u in units]), units, readers)
        stats.seconds["pairs"] = round(time.perf_counter() - start - stats.seconds["prompts"], 2)
        (tmp / SIDECAR).write_text(json.dumps(asdict(stats), indent=2))
        write_meta(tmp, shapes, part_summaries[0].embed_shape, part_summaries[0].pooled_shape,
                   model={"preset": preset, **model_kwargs})
        if cache_dir.exists():  # `_check_target` allowed it: empty, or a complete cache with overwrite=True
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        _stop(actors)
        shutil.rmtree(tmp, ignore_errors=True)
    if stats.skipped_rows:
        log.warning("%s: skipped %d of %d rows with undecodable images (first rows: %s)", pairs,
                    len(stats.skipped_rows), stats.rows_in, stats.skipped_rows[:10])
    return stats


def _pair_units(readers: list[PreferenceReader]) -> list[dict]:
    """One unit per (file, row group), named by both; `offset` turns file rows into rows over all inputs."""
    units, offset = [], 0
    for i, r in enumerate(readers):
        columns = [c for c in ("prompt", "image_win", "image_lose", *OPTIONAL_COLUMNS) if c in r.file.schema_arrow.names]
        for group, first, _ in r.row_groups():
            units.append(dict(name=f"{i:04d}-{group:05d}", path=str(r.path.resolve()), group=group, first_row=first,
                              offset=offset, columns=columns))
        offset += r.num_rows
    return units


def _run(actors: list, method: str, calls: list[tuple]) -> list:
    """Deal `calls` to the actors (each takes the next when it is free); every result an actor sends the driver
    passes here. Stops at the first summary that reports an error."""
    pool = ActorPool(actors)
    results = []
    for result in pool.map_unordered(lambda actor, args: getattr(actor, method).remote(*args), calls):
        if getattr(result, "error", None):
            raise PreferenceDataError(result.error)
        results.append(result)
    return results


def _apply(stats: PreprocessStats, summaries: list[ShardSummary], units: list[dict],
           readers: list[PreferenceReader]) -> list[int]:
    """Fold the pair summaries into `stats`; returns the latent shape."""
    offset = {u["name"]: u["offset"] for u in units}
    for s in sorted(summaries, key=lambda s: s.unit):
        stats.rows_written += s.rows_written
        stats.ties += s.ties
        stats.skipped_rows += [offset[s.unit] + r for r in s.skipped_rows]
    reasons = [s.first_skip_reason for s in sorted(summaries, key=lambda s: s.unit) if s.first_skip_reason]
    if reasons:
        log.warning("first undecodable image: %s", reasons[0])
    if stats.rows_written == 0:
        raise PreferenceDataError(f"{', '.join(str(r.path) for r in readers)}: all {stats.rows_in} rows were skipped "
                                  f"(undecodable images); no cache written")
    return next(s.latent_shape for s in summaries if s.latent_shape)


def _stop(actors: list) -> None:
    """Kill the encoders and wait until they are gone, so none still writes into a directory being removed."""
    pings = [a.__ray_ready__.remote() for a in actors]
    for a in actors:
        ray.kill(a)
    for ref in pings:
        try:
            ray.get(ref, timeout=60)
        except Exception:  # RayActorError once it is dead: what we wait for
            pass


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
                           model_kwargs: dict, tie_fraction: float = 0.0, **options) -> Path:
    """The cache of the built-in synthetic set (`drm_ray.data.synthetic`) at `cache_dir`, built unless present.

    `options` are `preprocess_pairs`' (`encoder_options(cfg.data)`). A present cache must have been built from the
    same set (n, seed, resolution, tie_fraction), model and latent dtype, else `CacheError`: a stale cache is never
    silently reused. The synthetic Parquet is written next to `cache_dir` (so every node of a cluster whose output
    directory is shared can read it) and removed afterwards.
    """
    cache_dir = Path(cache_dir)
    synthetic = {"n": n, "seed": seed, "resolution": model_kwargs["resolution"], "tie_fraction": tie_fraction}
    if (cache_dir / "meta.json").is_file():
        _check_same_cache(cache_dir, {"preset": preset, **model_kwargs}, synthetic,
                          options.get("latent_dtype", "float32"))
        return cache_dir
    work = cache_dir.with_name(f".{cache_dir.name}.pairs-{os.getpid()}")
    try:
        pairs = work / "pairs.parquet"
        write_synthetic_parquet(pairs, n, synthetic["resolution"], seed, tie_fraction)
        preprocess_pairs(pairs, cache_dir, preset=preset, model_kwargs=model_kwargs, synthetic=synthetic, **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache_dir


def _check_same_cache(cache_dir: Path, model: dict, synthetic: dict, latent_dtype: str = "float32") -> None:
    meta = read_meta(cache_dir)
    sidecar = cache_dir / SIDECAR
    built_from = json.loads(sidecar.read_text()).get("synthetic") if sidecar.is_file() else None
    # JSON turns tuples into lists: compare through the same round trip
    want = json.loads(json.dumps({"model": model, "synthetic": synthetic, "cache": {"latent_dtype": latent_dtype}}))
    have = {"model": meta.get("model") or {}, "synthetic": built_from or {},
            "cache": {"latent_dtype": meta.get("latent_dtype")}}
    diff = [f"{sec}.{k}: cache has {have[sec].get(k)!r}, wanted {want[sec].get(k)!r}"
            for sec in want for k in sorted(set(want[sec]) | set(have[sec])) if have[sec].get(k) != want[sec].get(k)]
    if diff:
        raise CacheError(f"{cache_dir} holds a different cache ({'; '.join(diff)}); delete it or choose another "
                         f"cache directory")


def cache_dir_for(pairs: str | Path, root: str | Path, preset: str, model_kwargs: dict,
                  latent_dtype: str = "float32") -> Path:
    """A cache location keyed by every input file (path, size, mtime), the encoding model and the latent dtype, so
    a job never reuses a cache built from other files or another model."""
    files = preference_files(pairs)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = json.dumps([stats, preset, model_kwargs, latent_dtype], sort_keys=True, default=str)
    stem = Path(pairs).stem if len(files) == 1 else (Path(pairs).name if Path(pairs).is_dir() else "pairs")
    return Path(root) / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
