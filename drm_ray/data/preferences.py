"""The preference-pair Parquet format: an atomic writer and a validating, streaming reader.

Columns:
    prompt: string          the caption both images were generated for
    image_win: binary       encoded image bytes (PNG / JPEG; anything PIL decodes) of the preferred image
    image_lose: binary      the other image
    source: string          optional: where the pair came from (pickapic_v2, hpdv3, synthetic, ...)
    tie: bool               optional: a 0.5 / 0.5 pair, kept for tie-aware evaluation and dropped in training
    label: float            optional: the probability that image_win is preferred, in (0.5, 1] (null or absent: 1,
                            a plain preference); a soft preference (annotator agreement, a graded score gap) that
                            DRM training fits as a soft Bradley-Terry target

The reader validates a file where it enters (missing, empty, truncated or corrupt, missing columns, wrong column
types) and raises `PreferenceDataError` naming the file; an image that does not decode names the row and column too.
Images are decoded with PIL, converted to RGB, resized on the shorter side and center-cropped to a square (so a
non-square image is not distorted), and returned as float tensors in [0, 1]. Files are read batch by batch with
`pq.ParquetFile.iter_batches`, never whole.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("prompt", pa.string()), ("image_win", pa.binary()), ("image_lose", pa.binary()),
    ("source", pa.string()), ("tie", pa.bool_()), ("label", pa.float32()),
])
REQUIRED_COLUMNS = ("prompt", "image_win", "image_lose")
_TYPE_CHECKS = {  # column -> (predicate on the Arrow type, the type named in errors)
    "prompt": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "image_win": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "image_lose": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "source": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "tie": (pa.types.is_boolean, "bool"),
    "label": (pa.types.is_floating, "float"),
}
OPTIONAL_COLUMNS = ("source", "tie", "label")
BAD_IMAGE_MODES = ("error", "skip")


class PreferenceDataError(ValueError):
    """Preference data that is missing, malformed or undecodable; the message names the file (and row, column)."""


# ---------------------------------------------------------------------------------------------- images


def image_to_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """Encode a PIL image for the `image_win` / `image_lose` columns."""
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> [3, resolution, resolution] float32 in [0, 1]. Raises whatever PIL raises."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, H, W]


def decode_pairs(path: str | Path, row_index: Iterable[int], image_win: Iterable, image_lose: Iterable,
                 resolution: int, on_bad_image: str = "error"
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[int, str]]:
    """Decode both images of each row: (win [B, 3, R, R], lose [B, 3, R, R], kept rows, {skipped row: why}).

    `path` and `row_index` (rows of the file) only name the culprit: with `on_bad_image="error"` the first image that
    does not decode (or is null) raises `PreferenceDataError`; with "skip" its row is left out and reported.
    """
    if on_bad_image not in BAD_IMAGE_MODES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_MODES}, got {on_bad_image!r}")
    wins, loses, kept, skipped = [], [], [], {}
    for row, win, lose in zip(row_index, image_win, image_lose):
        try:
            pair = [_decode_cell(path, int(row), col, data, resolution)
                    for col, data in (("image_win", win), ("image_lose", lose))]
        except PreferenceDataError as err:
            if on_bad_image == "error":
                raise
            skipped[int(row)] = str(err)
            continue
        wins.append(pair[0])
        loses.append(pair[1])
        kept.append(int(row))
    if not kept:
        empty = torch.zeros(0, 3, resolution, resolution)
        return empty, empty.clone(), kept, skipped
    return torch.stack(wins), torch.stack(loses), kept, skipped  # [B, 3, R, R] each


def _decode_cell(path, row: int, column: str, data, resolution: int) -> torch.Tensor:
    if data is None or len(data) == 0:
        raise PreferenceDataError(f"{path}: row {row}, column {column}: the image is missing (null or empty bytes)")
    try:
        return decode_image(data, resolution)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors... for corrupt bytes
        raise PreferenceDataError(f"{path}: row {row}, column {column}: cannot decode the image "
                                  f"({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------- writing


def write_preference_parquet(path: str | Path, rows: Iterable[dict], *, batch_size: int = 256) -> int:
    """Write preference rows (dicts with prompt, image_win, image_lose[, source, tie, label]) and return how many.

    Rows are consumed lazily and written `batch_size` at a time (one row group each) to a temporary file in the same
    directory, renamed over `path` only when complete: any failure, including one raised by the `rows` iterable,
    removes the temporary file and leaves `path` untouched. Zero rows is an error (the reader rejects empty files).
    """
    path = Path(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count, batch = 0, []
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for row in rows:
                batch.append(_checked_row(path, count, row))
                count += 1
                if len(batch) == batch_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        if count == 0:
            raise PreferenceDataError(f"{path}: no rows to write; nothing was written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _checked_row(path: Path, index: int, row: dict) -> dict:
    def bad(msg: str) -> PreferenceDataError:
        return PreferenceDataError(f"{path}: row {index}: {msg}")
    if not isinstance(row, dict):
        raise bad(f"must be a dict, got {type(row).__name__}")
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}; known: {SCHEMA.names}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad(f"prompt must be a non-empty string, got {prompt!r}")
    for col in ("image_win", "image_lose"):
        if not isinstance(row.get(col), (bytes, bytearray)) or len(row[col]) == 0:
            raise bad(f"{col} must be non-empty encoded image bytes, got {type(row.get(col)).__name__}")
    source, tie = row.get("source") or "", row.get("tie", False)
    if not isinstance(source, str):
        raise bad(f"source must be a string, got {source!r}")
    if not isinstance(tie, (bool, np.bool_)):
        raise bad(f"tie must be a bool, got {tie!r}")
    label = row.get("label")
    if label is not None:
        if tie:
            raise bad(f"a tie has no label (it is 0.5 by definition), got label {label!r}")
        if label_error(label):
            raise bad(label_error(label))
        label = float(label)
    return dict(prompt=prompt, image_win=bytes(row["image_win"]), image_lose=bytes(row["image_lose"]),
                source=source, tie=bool(tie), label=label)


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class PreferenceBatch:
    prompt: list[str]
    image_win: torch.Tensor     # [B, 3, R, R] float32 in [0, 1]
    image_lose: torch.Tensor    # [B, 3, R, R]
    tie: torch.Tensor           # [B] bool
    label: torch.Tensor         # [B] float32: P(image_win preferred); 1 for a plain preference, 0.5 for a tie
    source: list[str]
    row_index: list[int]        # rows of the file, for error messages and joins

    def __len__(self) -> int:
        return len(self.prompt)


class PreferenceReader:
    """A validated preference file; constructing one checks the file, `iter_batches` streams decoded pairs.

        reader = PreferenceReader("pairs.parquet", on_bad_image="skip")
        for batch in reader.iter_batches(32, resolution=64): ...
        reader.skipped_rows   # rows left out because an image did not decode
    """

    def __init__(self, path: str | Path, on_bad_image: str = "error"):
        if on_bad_image not in BAD_IMAGE_MODES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_MODES}, got {on_bad_image!r}")
        self.path = Path(path)
        self.on_bad_image = on_bad_image
        self.file = open_preference_file(self.path)
        names = self.file.schema_arrow.names
        self.has_source, self.has_tie = "source" in names, "tie" in names
        self.num_rows = self.file.metadata.num_rows
        self.skipped_rows: list[int] = []
        self._first_skip_reason: str | None = None

    def row_groups(self) -> list[tuple[int, int, int]]:
        """(row group, first row, rows) for every row group: units of work that know their row numbers."""
        spans, first = [], 0
        for g in range(self.file.num_row_groups):
            n = self.file.metadata.row_group(g).num_rows
            spans.append((g, first, n))
            first += n
        return spans

    def check_prompts(self, batch_size: int = 65536) -> None:
        """Stream the prompt column alone (cheap: no image bytes are read) and reject null or blank prompts."""
        for _ in self.iter_prompts(batch_size):
            pass

    def iter_prompts(self, batch_size: int = 65536) -> Iterator[str]:
        """Every row's prompt, in file order, from the prompt column alone; a null or blank one raises."""
        first = 0
        for table in _guarded(self.path, self.file.iter_batches(batch_size=batch_size, columns=["prompt"])):
            prompts = table.column("prompt").to_pylist()
            check_prompts(self.path, range(first, first + table.num_rows), prompts)
            first += table.num_rows
            yield from prompts

    def iter_batches(self, batch_size: int, resolution: int) -> Iterator[PreferenceBatch]:
        """Decoded batches of at most `batch_size` pairs (fewer where rows were skipped), in file order."""
        self.skipped_rows, self._first_skip_reason = [], None
        columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in self.file.schema_arrow.names]
        first = 0
        for table in _guarded(self.path, self.file.iter_batches(batch_size=batch_size, columns=columns)):
            cols = table.to_pydict()
            n = len(cols["prompt"])
            rows = range(first, first + n)
            first += n
            check_prompts(self.path, rows, cols["prompt"])
            labels = pair_labels(self.path, rows, cols.get("tie"), cols.get("label"))
            win, lose, kept, skipped = decode_pairs(self.path, rows, cols["image_win"], cols["image_lose"],
                                                    resolution, self.on_bad_image)
            self.skipped_rows += list(skipped)
            self._first_skip_reason = self._first_skip_reason or next(iter(skipped.values()), None)
            if not kept:
                continue
            pos = [r - rows.start for r in kept]
            ties = cols.get("tie", [False] * n)
            sources = cols.get("source", [""] * n)
            yield PreferenceBatch(prompt=[cols["prompt"][i] for i in pos], image_win=win, image_lose=lose,
                                  tie=torch.tensor([bool(ties[i]) for i in pos], dtype=torch.bool),
                                  label=torch.tensor([labels[i] for i in pos], dtype=torch.float32),
                                  source=[sources[i] or "" for i in pos], row_index=kept)
        if self.skipped_rows:
            log.warning("%s: skipped %d of %d rows whose images do not decode (rows %s; first: %s)", self.path,
                        len(self.skipped_rows), self.num_rows, self.skipped_rows[:10], self._first_skip_reason)


def preference_files(pairs: str | Path) -> list[Path]:
    """The files `pairs` names: a file, a directory (every *.parquet in it, sorted) or a glob (sorted matches)."""
    path = Path(pairs)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise PreferenceDataError(f"preference directory {path} holds no *.parquet files")
        return files
    if any(c in str(pairs) for c in "*?[") and not path.exists():
        files = sorted(Path(p) for p in glob.glob(str(pairs)) if Path(p).is_file())
        if not files:
            raise PreferenceDataError(f"preference glob {pairs} matches no files")
        return files
    return [path]  # a missing file fails in open_preference_file, with its name


def open_preference_file(path: str | Path) -> pq.ParquetFile:
    """Open and validate a preference file's container and schema (reads the footer only)."""
    path = Path(path)
    if not path.exists():
        raise PreferenceDataError(f"preference file {path} does not exist")
    if not path.is_file():
        raise PreferenceDataError(f"preference file {path} is not a file")
    if path.stat().st_size == 0:
        raise PreferenceDataError(f"preference file {path} is empty (0 bytes)")
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for truncated or non-Parquet files
        raise PreferenceDataError(f"preference file {path} is not a readable Parquet file (truncated or corrupt?): "
                                  f"{err}") from err
    schema = pf.schema_arrow
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise PreferenceDataError(f"preference file {path} lacks column(s) {missing}; it has {schema.names} "
                                  f"(required: {list(REQUIRED_COLUMNS)}, optional: {', '.join(OPTIONAL_COLUMNS)})")
    for name, (ok, expected) in _TYPE_CHECKS.items():
        if name in schema.names and not ok(schema.field(name).type):
            raise PreferenceDataError(f"preference file {path}: column {name!r} has type {schema.field(name).type}, "
                                      f"expected {expected}")
    if pf.metadata.num_rows == 0:
        raise PreferenceDataError(f"preference file {path} holds no rows")
    return pf


def read_row_group(path: str | Path, group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group of a preference file, with read errors (corrupt pages) named by file and row group."""
    try:
        return pq.ParquetFile(path).read_row_group(group, columns=columns)
    except Exception as err:  # see open_preference_file
        raise PreferenceDataError(f"preference file {path}: row group {group} is unreadable (corrupt?): "
                                  f"{err}") from err


def label_error(label) -> str | None:
    """Why `label` is not a usable soft preference (None when it is)."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, float, np.floating, np.integer)):
        return f"label must be a number in (0.5, 1], got {label!r}"
    if not 0.5 < float(label) <= 1.0:  # NaN fails too
        return (f"label must be in (0.5, 1] (the probability that image_win is preferred; a tie is tie=true), "
                f"got {label!r}")
    return None


def pair_labels(path, rows: Iterable[int], ties: list | None, labels: list | None) -> list[float]:
    """Each row's P(image_win preferred) from the optional tie and label columns: 0.5 for a tie, the label where
    given, else 1. A label out of (0.5, 1], or on a tie, is an error naming its row."""
    out = []
    for j, row in enumerate(rows):
        tie = bool(ties[j]) if ties is not None and ties[j] is not None else False
        label = labels[j] if labels is not None else None
        if label is not None:
            msg = "a tie has no label (it is 0.5 by definition)" if tie else label_error(label)
            if msg:
                raise PreferenceDataError(f"{path}: row {row}, column label: {msg}")
        out.append(0.5 if tie else (1.0 if label is None else float(label)))
    return out


def check_prompts(path, rows: Iterable[int], prompts: Iterable) -> None:
    """A null or blank prompt is an error naming its row."""
    for row, prompt in zip(rows, prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PreferenceDataError(f"{path}: row {row}, column prompt: must be a non-empty string, got {prompt!r}")



def _guarded(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Re-raise read errors met mid-file (a corrupt data page behind an intact footer) naming the file."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            raise PreferenceDataError(f"preference file {path} is unreadable past its footer (corrupt?): "
                                      f"{err}") from err
        yield batch
