"""Converters from public preference layouts into the preference Parquet of `drm_ray.data.preferences`.

- Pick-a-Pic v2: Parquet file(s) with `caption`, `jpg_0`, `jpg_1` (image bytes), `label_0`, `label_1`. Label
  (1, 0) prefers jpg_0, (0, 1) prefers jpg_1, (0.5, 0.5) is a tie (written with `tie=True` only when `keep_ties`).
- HPDv3: records with `prompt`, `path1` (preferred), `path2`, the paths relative to an image root directory, as a
  JSON list (parsed whole: the records are short text, the images are read one pair at a time), JSONL or Parquet.

Both stream pairs into `write_preference_parquet` (temporary file, renamed when complete). Structural problems (a
missing or unreadable input, a missing column or key, a wrong type) raise `PreferenceDataError` naming the file and
row; a row that cannot become a pair (bad label, empty caption, missing or undecodable image, identical images) is
skipped and counted by reason in the returned `ConversionReport`, and the counts are logged.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from drm_ray.data.preferences import PreferenceDataError, write_preference_parquet

log = logging.getLogger(__name__)

_STRING = (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string")
PICKAPIC_COLUMNS = {  # column -> (predicate on the Arrow type, the type named in errors)
    "caption": _STRING,
    "jpg_0": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "jpg_1": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "label_0": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "a number"),
    "label_1": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "a number"),
}
HPD_KEYS = ("prompt", "path1", "path2")


@dataclass
class ConversionReport:
    output: Path
    rows_read: int = 0
    rows_written: int = 0
    ties: int = 0               # tie pairs seen (written only with keep_ties)
    skipped: Counter = field(default_factory=Counter)   # reason -> rows

    def log(self) -> None:
        log.info("%s: wrote %d pairs from %d rows (%d ties seen)", self.output, self.rows_written, self.rows_read,
                 self.ties)
        if self.skipped:
            log.warning("%s: skipped %d rows: %s", self.output, sum(self.skipped.values()), dict(self.skipped))


def _is_image(data) -> bool:
    """Whether PIL recognises the bytes as an image (header check; full decoding happens at preprocessing)."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types for corrupt bytes
        return False


def _write(out: Path, rows: Iterator[dict], report: ConversionReport, batch_size: int) -> ConversionReport:
    first = next(rows, None)  # peek, so that "nothing usable" is reported with its reasons
    if first is None:
        raise PreferenceDataError(f"{out}: no usable pairs in {report.rows_read} input rows (ties seen: "
                                  f"{report.ties}, skipped: {dict(report.skipped)}); nothing was written")
    report.rows_written = write_preference_parquet(out, itertools.chain([first], rows), batch_size=batch_size)
    report.log()
    return report


# ---------------------------------------------------------------------------------------------- Pick-a-Pic v2


def convert_pickapic(sources: str | Path | Sequence[str | Path], out: str | Path, *, keep_ties: bool = False,
                     batch_size: int = 256) -> ConversionReport:
    """Pick-a-Pic v2 Parquet (one file, a directory of *.parquet, or a list of files) -> preference Parquet."""
    files = _parquet_files(sources)
    report = ConversionReport(output=Path(out))

    def rows() -> Iterator[dict]:
        for path in files:
            pf = _open_parquet(path, PICKAPIC_COLUMNS)
            for batch in _batches(path, pf, list(PICKAPIC_COLUMNS), batch_size):
                cols = batch.to_pydict()
                for i in range(batch.num_rows):
                    report.rows_read += 1
                    row = _pickapic_row(cols["caption"][i], cols["jpg_0"][i], cols["jpg_1"][i],
                                        cols["label_0"][i], cols["label_1"][i], report, keep_ties)
                    if row is not None:
                        yield row

    return _write(Path(out), rows(), report, batch_size)


def _pickapic_row(caption, jpg_0, jpg_1, label_0, label_1, report: ConversionReport, keep_ties: bool) -> dict | None:
    labels = (label_0, label_1)
    if labels == (0.5, 0.5):
        report.ties += 1
        if not keep_ties:
            return None
        win, lose, tie = jpg_0, jpg_1, True
    elif labels == (1, 0):
        win, lose, tie = jpg_0, jpg_1, False
    elif labels == (0, 1):
        win, lose, tie = jpg_1, jpg_0, False
    else:
        report.skipped["invalid label"] += 1
        return None
    reason = _pair_problem(caption, win, lose)
    if reason:
        report.skipped[reason] += 1
        return None
    return dict(prompt=caption, image_win=win, image_lose=lose, source="pickapic_v2", tie=tie)


def _pair_problem(prompt, win, lose) -> str | None:
    """Why a pair cannot be written, or None."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty prompt"
    if not win or not lose:
        return "missing image"
    if win == lose:
        return "identical images"
    if not (_is_image(win) and _is_image(lose)):
        return "undecodable image"
    return None


def _parquet_files(sources) -> list[Path]:
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(item.glob("*.parquet"))
            if not found:
                raise PreferenceDataError(f"{item} holds no *.parquet files")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise PreferenceDataError(f"input {item} does not exist")
    if not files:
        raise PreferenceDataError("no input files given")
    return files


def _open_parquet(path: Path, columns: dict) -> pq.ParquetFile:
    if path.stat().st_size == 0:
        raise PreferenceDataError(f"{path} is empty (0 bytes)")
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for truncated or non-Parquet files
        raise PreferenceDataError(f"{path} is not a readable Parquet file (truncated or corrupt?): {err}") from err
    schema = pf.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise PreferenceDataError(f"{path} lacks column(s) {missing}; it has {schema.names}")
    for name, (ok, expected) in columns.items():
        if not ok(schema.field(name).type):
            raise PreferenceDataError(f"{path}: column {name!r} has type {schema.field(name).type}, "
                                      f"expected {expected}")
    return pf


def _batches(path: Path, pf: pq.ParquetFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    it = pf.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:  # a corrupt data page behind an intact footer
            raise PreferenceDataError(f"{path} is unreadable past its footer (corrupt?): {err}") from err
        yield batch


# ---------------------------------------------------------------------------------------------- HPDv3


def convert_hpdv3(source: str | Path, image_root: str | Path, out: str | Path, *,
                  batch_size: int = 256) -> ConversionReport:
    """HPDv3 records (.json list, .jsonl or .parquet) + images under `image_root` -> preference Parquet."""
    source, image_root = Path(source), Path(image_root)
    if not source.is_file():
        raise PreferenceDataError(f"input {source} does not exist")
    if not image_root.is_dir():
        raise PreferenceDataError(f"image root {image_root} is not a directory")
    report = ConversionReport(output=Path(out))

    def rows() -> Iterator[dict]:
        for index, record in enumerate(_hpd_records(source, batch_size)):
            report.rows_read += 1
            if not isinstance(record, dict) or any(k not in record for k in HPD_KEYS):
                have = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise PreferenceDataError(f"{source}: record {index} must have keys {list(HPD_KEYS)}, has {have}")
            for key in ("path1", "path2"):
                if not isinstance(record[key], str) or not record[key]:
                    raise PreferenceDataError(f"{source}: record {index}: {key} must be a non-empty path string, "
                                              f"got {record[key]!r}")
            paths = [image_root / record["path1"], image_root / record["path2"]]
            if not all(p.is_file() for p in paths):
                report.skipped["missing image file"] += 1
                continue
            win, lose = (p.read_bytes() for p in paths)
            reason = _pair_problem(record["prompt"], win, lose)
            if reason:
                report.skipped[reason] += 1
                continue
            yield dict(prompt=record["prompt"], image_win=win, image_lose=lose, source="hpdv3", tie=False)

    return _write(Path(out), rows(), report, batch_size)


def _hpd_records(path: Path, batch_size: int) -> Iterable:
    if path.suffix == ".parquet":
        pf = _open_parquet(path, {k: _STRING for k in HPD_KEYS})
        for batch in _batches(path, pf, list(HPD_KEYS), batch_size):
            yield from batch.to_pylist()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise PreferenceDataError(f"{path}: line {line_no} is not valid JSON: {err}") from err
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PreferenceDataError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(records, list):
            raise PreferenceDataError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
        yield from records
    else:
        raise PreferenceDataError(f"{path}: unknown HPDv3 file type {path.suffix!r} (expected .json, .jsonl, .parquet)")
