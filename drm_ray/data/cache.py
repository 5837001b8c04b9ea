"""The embedding cache: preference pairs as VAE latents and text embeddings, written once, read by training/eval.

A cache is a directory:
    meta.json              {"latent_shape": [C, h, w], "embed_shape": [L, D], "pooled_shape": [P], "num_rows": N,
                            "embed_dtype": "float16", "model": {...}}
    shard-00000.parquet    prompt: string, source: string, label: float32, latent_win: binary, latent_lose: binary,
    shard-00001.parquet    prompt_embeds: binary, pooled: binary
Tensors are raw little-endian bytes (latents float32; text embeddings float16 to halve the size; SD3.5's are
333 x 4096 per prompt); shapes live in meta.json. `label` is 1.0 when `latent_win` is preferred and 0.5 for a tie
(kept for tie-aware evaluation, dropped in training).

Shards are written to a temporary name and renamed when complete, and meta.json is written last, so a reader never
sees a half-written cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

SCHEMA = pa.schema([
    ("prompt", pa.string()), ("source", pa.string()), ("label", pa.float32()),
    ("latent_win", pa.binary()), ("latent_lose", pa.binary()), ("prompt_embeds", pa.binary()), ("pooled", pa.binary()),
])
TENSOR_DTYPES = {"latent_win": np.float32, "latent_lose": np.float32, "prompt_embeds": np.float16,
                 "pooled": np.float16}


class CacheError(ValueError):
    """A cache directory that is missing, incomplete or inconsistent; the message names the path."""


@dataclass
class PairBatch:
    latent_win: torch.Tensor    # [B, C, h, w] float32
    latent_lose: torch.Tensor   # [B, C, h, w] float32
    prompt_embeds: torch.Tensor  # [B, L, D] float32
    pooled: torch.Tensor        # [B, P] float32
    label: torch.Tensor         # [B] 1.0 (win preferred) or 0.5 (tie)
    prompt: list[str]

    def __len__(self) -> int:
        return len(self.prompt)

    def to(self, device) -> "PairBatch":
        return PairBatch(self.latent_win.to(device), self.latent_lose.to(device), self.prompt_embeds.to(device),
                         self.pooled.to(device), self.label.to(device), self.prompt)


def pair_rows(batch: PairBatch, source: list[str] | None = None) -> dict[str, list]:
    """Column dict for `write_shard` from tensors (the inverse of `_decode`)."""
    def raw(t: torch.Tensor, dtype) -> list[bytes]:
        arr = t.detach().cpu().float().numpy().astype(dtype)
        return [row.tobytes() for row in arr]
    return {
        "prompt": list(batch.prompt), "source": list(source or [""] * len(batch)),
        "label": batch.label.float().tolist(),
        **{name: raw(getattr(batch, name), dtype) for name, dtype in TENSOR_DTYPES.items()},
    }


def write_shard(cache_dir: str | Path, index: int, columns: dict[str, list]) -> Path:
    """Write one shard atomically (temporary name, then rename)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"shard-{index:05d}.parquet"
    tmp = cache_dir / f".shard-{index:05d}.parquet.tmp"
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA), tmp)
    os.replace(tmp, final)
    return final


def write_meta(cache_dir: str | Path, latent_shape, embed_shape, pooled_shape, model: dict | None = None) -> None:
    """Written last: its presence marks a complete cache."""
    cache_dir = Path(cache_dir)
    shards = sorted(cache_dir.glob("shard-*.parquet"))
    num_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    meta = dict(latent_shape=list(latent_shape), embed_shape=list(embed_shape), pooled_shape=list(pooled_shape),
                num_rows=num_rows, num_shards=len(shards), embed_dtype="float16", model=model or {})
    tmp = cache_dir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, cache_dir / "meta.json")


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a complete embedding cache (no meta.json); run the preprocessing step")
    return json.loads(path.read_text())


def _decode(table: pa.Table, meta: dict) -> PairBatch:
    shapes = {"latent_win": meta["latent_shape"], "latent_lose": meta["latent_shape"],
              "prompt_embeds": meta["embed_shape"], "pooled": meta["pooled_shape"]}
    out = {}
    for name, dtype in TENSOR_DTYPES.items():
        col = table.column(name).to_pylist()
        arr = np.frombuffer(b"".join(col), dtype=dtype).reshape(len(col), *shapes[name])
        out[name] = torch.from_numpy(arr.astype(np.float32))
    return PairBatch(label=torch.tensor(table.column("label").to_pylist(), dtype=torch.float32),
                     prompt=table.column("prompt").to_pylist(), **out)


def iter_pairs(cache_dir: str | Path, batch_size: int, *, rank: int = 0, world_size: int = 1,
               drop_ties: bool = False, seed: int | None = None, loop: bool = False) -> Iterator[PairBatch]:
    """Stream batches from a cache without loading it whole.

    Row groups are dealt round-robin to `world_size` ranks; with `seed` they are visited in a shuffled order (per
    epoch) and rows are shuffled within a buffer of a few row groups. `loop=True` repeats epochs forever.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    units = [(p, g) for p in sorted(cache_dir.glob("shard-*.parquet")) for g in range(pq.ParquetFile(p).num_row_groups)]
    # Whole row groups per rank when there are enough of them; otherwise every rank reads every group and keeps
    # every world_size-th row, so a small cache (an eval set in one shard) still feeds all ranks.
    by_group = len(units) >= world_size
    mine = units[rank::world_size] if by_group else units
    if not mine:
        raise CacheError(f"{cache_dir} holds no shards")
    epoch, pending = 0, None
    while True:
        order = list(mine)
        if seed is not None:
            rng = np.random.default_rng(seed + epoch)
            order = [order[i] for i in rng.permutation(len(order))]
        else:
            rng = None
        rows_seen = 0
        for path, group in order:
            part = _decode(pq.ParquetFile(path).read_row_group(group), meta)
            if not by_group:
                part = _select(part, torch.arange(rank, len(part), world_size))
            if drop_ties:
                part = _select(part, (part.label == 1.0).nonzero().flatten())
            rows_seen += len(part)
            pending = part if pending is None else _concat(pending, part)
            if rng is not None:  # shuffle within the buffer of rows not yet served
                pending = _select(pending, torch.from_numpy(rng.permutation(len(pending))))
            while len(pending) >= batch_size:
                yield _select(pending, torch.arange(batch_size))
                pending = _select(pending, torch.arange(batch_size, len(pending)))
        epoch += 1
        if not loop:
            if pending is not None and len(pending):
                yield pending
            return
        if rows_seen == 0:
            raise CacheError(f"{cache_dir}: rank {rank} of {world_size} has no rows to serve"
                             + (" (every pair is a tie)" if drop_ties else ""))


def _select(b: PairBatch, idx: torch.Tensor) -> PairBatch:
    return PairBatch(b.latent_win[idx], b.latent_lose[idx], b.prompt_embeds[idx], b.pooled[idx], b.label[idx],
                     [b.prompt[i] for i in idx.tolist()])


def _concat(a: PairBatch, b: PairBatch) -> PairBatch:
    return PairBatch(*(torch.cat([getattr(a, n), getattr(b, n)]) for n in
                       ("latent_win", "latent_lose", "prompt_embeds", "pooled", "label")), a.prompt + b.prompt)
