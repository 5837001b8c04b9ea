"""The embedding cache (format 2): preference pairs as VAE latents, prompts as text embeddings stored once each.

A cache is a directory:
    meta.json                      written last; its presence marks a complete cache (fields below)
    shard-<name>.parquet           one pair per row: prompt_id: string, source: string, label: float32,
                                   latent_win: binary, latent_lose: binary
    prompts/part-<name>.parquet    the part's prompts in row order: prompt_id: string, prompt: string
    prompts/part-<name>.embeds.npy [n, L, D] float16   text embeddings, memory-mappable
    prompts/part-<name>.pooled.npy [n, P] float16      pooled text embeddings
    prompts/index.parquet          prompt_id, prompt, part, row: where each distinct prompt's embeddings live

Preference sets repeat prompts heavily, so a prompt's embeddings are stored once, keyed by `prompt_id` (the first 16
hex digits of the SHA-256 of its UTF-8 text), and pairs refer to it. Readers memory-map the .npy parts and read only
the rows a batch needs, so the table (hundreds of GB at paper scale) is never loaded whole and the training ranks of
a node share one copy in the OS page cache. Latents are raw little-endian bytes in `latent_dtype` (float32, float16,
or bfloat16 stored as its 16-bit pattern); `label` is the probability that `latent_win` is preferred: 1.0 for a plain
preference, (0.5, 1) for a soft one (the preference file's `label` column), 0.5 for a tie (kept for tie-aware
evaluation, dropped in training).

Bytes (payload; Parquet and .npy headers add a few hundred bytes per file):
    per pair     2 * C*h*w * itemsize(latent_dtype) + ~40 (id, label, source)
    per prompt   (L*D + P) * 2 + ~50 + len(prompt) (id and text, in the part and in the index)
    tiny         [16, 8, 8] latents: 8 KiB per pair (fp32), 4 KiB (bf16); [109, 64] + [64]: 14 080 B per prompt
    SD3.5-M      [16, 64, 64] bf16 latents: 256 KiB per pair; [333, 4096] + [2048] fp16: 2.73 MB per prompt,
                 so 1.4M pairs over 100k prompts ~ 367 GB of pairs + 273 GB of prompt table (format 1, with
                 float32 latents and embeddings per pair: 4.6 TB)

meta.json: format_version, latent_shape, latent_dtype, embed_shape, pooled_shape, embed_dtype, num_rows,
num_shards, num_prompts, num_prompt_parts, pair_bytes, prompt_bytes, model. Every file is written to a temporary name
and renamed when complete, and meta.json is written last (after checking that every pair's prompt is in the table).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

FORMAT_VERSION = 2
PAIR_SCHEMA = pa.schema([("prompt_id", pa.string()), ("source", pa.string()), ("label", pa.float32()),
                         ("latent_win", pa.binary()), ("latent_lose", pa.binary())])
PART_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])
INDEX_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("part", pa.string()),
                          ("row", pa.int32())])
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RAW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 travels as its bit pattern
EMBED_DTYPE = np.float16
PROMPTS = "prompts"


class CacheError(ValueError):
    """A cache directory that is missing, incomplete or inconsistent; the message names the path."""


@dataclass
class PairBatch:
    latent_win: torch.Tensor    # [B, C, h, w] float32
    latent_lose: torch.Tensor   # [B, C, h, w] float32
    prompt_embeds: torch.Tensor  # [B, L, D] float32
    pooled: torch.Tensor        # [B, P] float32
    label: torch.Tensor         # [B] P(win preferred): 1.0, a soft (0.5, 1), or 0.5 (tie)
    prompt: list[str]

    def __len__(self) -> int:
        return len(self.prompt)

    def to(self, device) -> "PairBatch":
        return PairBatch(self.latent_win.to(device), self.latent_lose.to(device), self.prompt_embeds.to(device),
                         self.pooled.to(device), self.label.to(device), self.prompt)


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- writing


def latent_bytes(latents: torch.Tensor, latent_dtype: str) -> list[bytes]:
    """[B, C, h, w] -> B raw rows in `latent_dtype` (the inverse of `_latents`)."""
    t = latents.detach().cpu().to(LATENT_DTYPES[latent_dtype]).contiguous()
    arr = t.view(torch.int16).numpy() if latent_dtype == "bfloat16" else t.numpy()
    return [row.tobytes() for row in arr]


def pair_columns(prompts: list[str], source: list[str], label, latent_win: torch.Tensor, latent_lose: torch.Tensor,
                 latent_dtype: str = "float32") -> dict:
    """Columns of one pair shard (`write_shard`); the prompts' embeddings go to a prompt part."""
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {sorted(LATENT_DTYPES)}, got {latent_dtype!r}")
    return {"prompt_id": [prompt_id(p) for p in prompts], "source": list(source),
            "label": [float(x) for x in label], "latent_win": latent_bytes(latent_win, latent_dtype),
            "latent_lose": latent_bytes(latent_lose, latent_dtype), "latent_dtype": latent_dtype}


def pair_rows(batch: PairBatch, source: list[str] | None = None, latent_dtype: str = "float32") -> dict:
    """Columns for `write_shard` from a PairBatch: the pairs plus their prompts' embeddings (small caches written
    from tensors: tests, tools; `preprocess` writes pairs and prompt parts separately)."""
    cols = pair_columns(batch.prompt, source or [""] * len(batch), batch.label.tolist(), batch.latent_win,
                        batch.latent_lose, latent_dtype)
    return {**cols, "prompt": list(batch.prompt), "prompt_embeds": batch.prompt_embeds, "pooled": batch.pooled}


def write_shard(cache_dir: str | Path, name: int | str, columns: dict) -> Path:
    """Write pair shard `shard-<name>.parquet` atomically; columns from `pair_columns` or `pair_rows` (whose
    prompts are also written, once per distinct prompt, as prompt part `<name>`)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"{name:05d}" if isinstance(name, int) else name
    if "prompt_embeds" in columns:
        first = {p: i for i, p in reversed(list(enumerate(columns["prompt"])))}  # prompt -> its first row
        rows = sorted(first.values())
        write_prompt_part(cache_dir, name, [columns["prompt"][i] for i in rows], columns["prompt_embeds"][rows],
                          columns["pooled"][rows])
    table = pa.Table.from_pydict({k: columns[k] for k in PAIR_SCHEMA.names}, schema=PAIR_SCHEMA)
    table = table.replace_schema_metadata({"latent_dtype": columns["latent_dtype"]})
    final = cache_dir / f"shard-{name}.parquet"
    # No statistics or dictionary for the latent columns: min/max of 4 KB-256 KB values would be copied into
    # the footer, and they never repeat
    small = ["prompt_id", "source", "label"]
    _atomic(final, lambda tmp: pq.write_table(table, tmp, write_statistics=small, use_dictionary=small[:2]))
    return final


def write_prompt_part(cache_dir: str | Path, name: int | str, prompts: list[str], embeds, pooled) -> int:
    """Write the embeddings of distinct `prompts` (embeds [n, L, D], pooled [n, P]) as prompt part `<name>`, stored
    in float16; returns the bytes written. The index is built from the parts by `write_meta`."""
    out = Path(cache_dir) / PROMPTS
    out.mkdir(parents=True, exist_ok=True)
    name = f"{name:05d}" if isinstance(name, int) else name
    arrays = {"embeds": _fp16(embeds), "pooled": _fp16(pooled)}  # [n, L, D], [n, P]
    if len(set(prompts)) != len(prompts) or any(len(a) != len(prompts) for a in arrays.values()):
        raise ValueError(f"prompt part {name}: {len(prompts)} prompts (distinct: {len(set(prompts))}) for "
                         f"{[len(a) for a in arrays.values()]} embedding rows")
    for kind, arr in arrays.items():
        def save(tmp, arr=arr):
            with open(tmp, "wb") as f:
                np.save(f, arr)
        _atomic(out / f"part-{name}.{kind}.npy", save)
    table = pa.Table.from_pydict({"prompt_id": [prompt_id(p) for p in prompts], "prompt": list(prompts)},
                                 schema=PART_SCHEMA)
    _atomic(out / f"part-{name}.parquet", lambda tmp: pq.write_table(table, tmp))
    return sum((out / f"part-{name}{ext}").stat().st_size for ext in (".embeds.npy", ".pooled.npy", ".parquet"))


def write_meta(cache_dir: str | Path, latent_shape, embed_shape, pooled_shape, model: dict | None = None) -> dict:
    """Index the prompt parts, check that every pair's prompt is in it, then write meta.json (last: its presence
    marks a complete cache). Returns the meta."""
    cache_dir = Path(cache_dir)
    shards = sorted(cache_dir.glob("shard-*.parquet"))
    dtypes = {(pq.read_schema(p).metadata or {}).get(b"latent_dtype", b"?").decode() for p in shards}
    if len(dtypes) > 1 or not dtypes <= set(LATENT_DTYPES):
        raise CacheError(f"{cache_dir}: pair shards disagree on or lack their latent dtype: {sorted(dtypes)}")
    index = _build_index(cache_dir)
    known = set(index.column("prompt_id").to_pylist())
    for p in shards:
        missing = set(pq.read_table(p, columns=["prompt_id"]).column(0).to_pylist()) - known
        if missing:
            raise CacheError(f"{p}: prompt ids {sorted(missing)[:5]} have no embeddings in {cache_dir / PROMPTS}")
    _atomic(cache_dir / PROMPTS / "index.parquet", lambda tmp: pq.write_table(index, tmp))
    meta = dict(format_version=FORMAT_VERSION, latent_shape=list(latent_shape),
                latent_dtype=dtypes.pop() if dtypes else "float32", embed_shape=list(embed_shape),
                pooled_shape=list(pooled_shape), embed_dtype="float16",
                num_rows=sum(pq.ParquetFile(p).metadata.num_rows for p in shards), num_shards=len(shards),
                num_prompts=index.num_rows, num_prompt_parts=len(list((cache_dir / PROMPTS).glob("part-*.parquet"))),
                pair_bytes=sum(p.stat().st_size for p in shards),
                prompt_bytes=sum(p.stat().st_size for p in (cache_dir / PROMPTS).iterdir()), model=model or {})
    _atomic(cache_dir / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta


def _build_index(cache_dir: Path) -> pa.Table:
    """prompt_id -> (part, row) over every prompt part; a prompt in several parts is served from the first."""
    ids, prompts, parts, rows, seen = [], [], [], [], {}
    for path in sorted((cache_dir / PROMPTS).glob("part-*.parquet")):
        name = path.name[len("part-"):-len(".parquet")]
        part = pq.read_table(path)
        n = np.load(cache_dir / PROMPTS / f"part-{name}.embeds.npy", mmap_mode="r").shape[0]
        if n != part.num_rows:
            raise CacheError(f"{path}: {part.num_rows} prompts for {n} embedding rows")
        for row, (pid, text) in enumerate(zip(part.column("prompt_id").to_pylist(), part.column("prompt").to_pylist())):
            if pid in seen:
                if seen[pid] != text:
                    raise CacheError(f"{cache_dir}: prompts {seen[pid]!r} and {text!r} share the id {pid}")
                continue
            seen[pid] = text
            ids.append(pid), prompts.append(text), parts.append(name), rows.append(row)
    return pa.Table.from_pydict({"prompt_id": ids, "prompt": prompts, "part": parts, "row": rows},
                                schema=INDEX_SCHEMA)


def _fp16(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x).astype(EMBED_DTYPE, copy=False))


def _atomic(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a complete embedding cache (no meta.json); run the preprocessing step")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{cache_dir} is an embedding cache of format {meta.get('format_version', 1)}; this "
                         f"drm-ray reads format {FORMAT_VERSION}: delete it and run the preprocessing step again")
    return meta


class PromptStore:
    """Random access to a cache's prompt table: the index in memory (ids and texts), embeddings memory-mapped."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir) / PROMPTS
        index = pq.read_table(self.dir / "index.parquet").to_pydict()
        self.where = {pid: (part, row) for pid, part, row in zip(index["prompt_id"], index["part"], index["row"])}
        self.text = dict(zip(index["prompt_id"], index["prompt"]))
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def _map(self, part: str, kind: str) -> np.ndarray:
        if (part, kind) not in self._maps:
            self._maps[part, kind] = np.load(self.dir / f"part-{part}.{kind}.npy", mmap_mode="r")
        return self._maps[part, kind]

    def gather(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of `ids` as float32: ([B, L, D], [B, P]); reads only those rows."""
        where = [self.where[i] for i in ids]
        by_part: dict[str, list[int]] = {}
        for pos, (part, _) in enumerate(where):
            by_part.setdefault(part, []).append(pos)
        out = {}
        for kind in ("embeds", "pooled"):
            buf = np.empty((len(ids), *self._map(where[0][0], kind).shape[1:]), dtype=EMBED_DTYPE)
            for part, pos in by_part.items():
                buf[pos] = self._map(part, kind)[[where[p][1] for p in pos]]  # read from the page cache
            out[kind] = torch.from_numpy(buf).float()  # one widening, by torch: several times faster than numpy's
        return out["embeds"], out["pooled"]


@dataclass
class _Rows:
    """Pairs not yet served: latents kept in their stored dtype, embeddings gathered only when a batch is served."""
    latent_win: torch.Tensor    # [n, C, h, w] latent_dtype
    latent_lose: torch.Tensor
    label: torch.Tensor         # [n]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, idx: torch.Tensor) -> "_Rows":
        return _Rows(self.latent_win[idx], self.latent_lose[idx], self.label[idx], [self.ids[i] for i in idx.tolist()])

    def slice(self, lo: int, hi: int) -> "_Rows":  # views: serving a batch copies nothing but its own rows
        return _Rows(self.latent_win[lo:hi], self.latent_lose[lo:hi], self.label[lo:hi], self.ids[lo:hi])

    def cat(self, other: "_Rows") -> "_Rows":
        return _Rows(torch.cat([self.latent_win, other.latent_win]), torch.cat([self.latent_lose, other.latent_lose]),
                     torch.cat([self.label, other.label]), self.ids + other.ids)


def _latents(col: pa.ChunkedArray, meta: dict) -> torch.Tensor:
    dtype = meta["latent_dtype"]
    arr = np.frombuffer(b"".join(col.to_pylist()), dtype=_RAW[dtype]).reshape(len(col), *meta["latent_shape"])
    t = torch.from_numpy(arr.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _decode(table: pa.Table, meta: dict) -> _Rows:
    return _Rows(_latents(table.column("latent_win"), meta), _latents(table.column("latent_lose"), meta),
                 torch.tensor(table.column("label").to_pylist(), dtype=torch.float32),
                 table.column("prompt_id").to_pylist())


def _serve(rows: _Rows, store: PromptStore) -> PairBatch:
    embeds, pooled = store.gather(rows.ids)  # [B, L, D], [B, P]
    # float32 latents are copied too, so a consumer that modifies a batch in place cannot touch rows not yet served
    return PairBatch(rows.latent_win.to(torch.float32, copy=True), rows.latent_lose.to(torch.float32, copy=True),
                     embeds, pooled, rows.label.clone(), [store.text[i] for i in rows.ids])


def iter_pairs(cache_dir: str | Path, batch_size: int, *, rank: int = 0, world_size: int = 1,
               drop_ties: bool = False, seed: int | None = None, loop: bool = False,
               prefetch: int = 2) -> Iterator[PairBatch]:
    """Stream batches from a cache without loading it whole.

    Row groups are dealt round-robin to `world_size` ranks; with `seed` they are visited in a shuffled order (per
    epoch) and rows are shuffled within a buffer of a few row groups. `loop=True` repeats epochs forever. With
    `prefetch` > 0 a background thread decodes up to that many batches ahead of the consumer (an error there is
    raised here, in the consumer); 0 decodes in the caller's thread.
    """
    batches = _iter_sync(Path(cache_dir), batch_size, rank, world_size, drop_ties, seed, loop)
    return _prefetched(batches, prefetch) if prefetch > 0 else batches


def _iter_sync(cache_dir: Path, batch_size: int, rank: int, world_size: int, drop_ties: bool, seed: int | None,
               loop: bool) -> Iterator[PairBatch]:
    meta = read_meta(cache_dir)
    store = PromptStore(cache_dir)
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
        rng = np.random.default_rng(seed + epoch) if seed is not None else None
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        rows_seen = 0
        for path, group in order:
            part = _decode(pq.ParquetFile(path).read_row_group(group), meta)
            if not by_group:
                part = part.select(torch.arange(rank, len(part), world_size))
            if drop_ties:
                part = part.select((part.label > 0.5).nonzero().flatten())  # a soft label < 1 stays
            rows_seen += len(part)
            pending = part if pending is None else pending.cat(part)
            if rng is not None:  # shuffle within the buffer of rows not yet served
                pending = pending.select(torch.from_numpy(rng.permutation(len(pending))))
            served = 0
            while len(pending) - served >= batch_size:
                yield _serve(pending.slice(served, served + batch_size), store)
                served += batch_size
            pending = pending.slice(served, len(pending))
        epoch += 1
        if not loop:
            if pending is not None and len(pending):
                yield _serve(pending, store)
            return
        if rows_seen == 0:
            raise CacheError(f"{cache_dir}: rank {rank} of {world_size} has no rows to serve"
                             + (" (every pair is a tie)" if drop_ties else ""))


_DONE = object()


def _prefetched(batches: Iterator, depth: int) -> Iterator:
    """Run `batches` in a daemon thread, at most `depth` items ahead; its exception is re-raised in the consumer.
    Closing the consumer (or dropping it) stops the thread at its next hand-over."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # handed to the consumer, which raises it
            put((None, err))

    thread = threading.Thread(target=produce, name="iter_pairs-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
