"""Converters from Pick-a-Pic v2 and HPDv3 layouts, on small files written here."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drm_ray.data.convert import convert_hpdv3, convert_pickapic
from drm_ray.data.preferences import PreferenceDataError, PreferenceReader, image_to_bytes

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(colour, size=16) -> bytes:
    return image_to_bytes(Image.new("RGB", (size, size), colour))


def jpeg(colour) -> bytes:
    return image_to_bytes(Image.new("RGB", (16, 16), colour), format="JPEG")


def read(path):
    reader = PreferenceReader(path)
    batches = list(reader.iter_batches(100, 4))
    return batches[0]


def is_red(image: torch.Tensor) -> bool:  # [3, R, R]
    return bool(image[0].mean() > 0.8 and image[2].mean() < 0.2)


def write_pickapic(path, rows):
    cols = dict(zip(("caption", "jpg_0", "jpg_1", "label_0", "label_1"), zip(*rows)))
    extra = {"are_different": [True] * len(rows)}  # the real set has more columns; they are ignored
    pq.write_table(pa.table({**{k: list(v) for k, v in cols.items()}, **extra}), path)


PICKAPIC_ROWS = [
    ("red wins first", png(RED), png(BLUE), 1.0, 0.0),
    ("red wins second", jpeg(BLUE), jpeg(RED), 0.0, 1.0),
    ("a tie", png(RED), png(BLUE, 20), 0.5, 0.5),
    ("bad label", png(RED), png(BLUE), 0.3, 0.7),
    ("", png(RED), png(BLUE), 1.0, 0.0),
    ("garbage", b"not an image", png(BLUE), 1.0, 0.0),
    ("same", png(RED), png(RED), 1.0, 0.0),
]


def test_pickapic_drops_ties_by_default_and_skips_with_reasons(tmp_path):
    src, out = tmp_path / "train-0.parquet", tmp_path / "pairs.parquet"
    write_pickapic(src, PICKAPIC_ROWS)
    report = convert_pickapic(src, out)
    assert (report.rows_read, report.rows_written, report.ties) == (7, 2, 1)
    assert dict(report.skipped) == {"invalid label": 1, "empty prompt": 1, "undecodable image": 1,
                                    "identical images": 1}
    b = read(out)
    assert b.prompt == ["red wins first", "red wins second"] and b.source == ["pickapic_v2"] * 2
    assert all(is_red(img) for img in b.image_win) and not any(is_red(img) for img in b.image_lose)
    assert not b.tie.any()


def test_pickapic_keeps_ties_on_request_and_reads_a_directory(tmp_path):
    (tmp_path / "src").mkdir()
    write_pickapic(tmp_path / "src" / "a.parquet", PICKAPIC_ROWS[:2])
    write_pickapic(tmp_path / "src" / "b.parquet", PICKAPIC_ROWS[2:])
    report = convert_pickapic(tmp_path / "src", tmp_path / "pairs.parquet", keep_ties=True)
    assert (report.rows_read, report.rows_written, report.ties) == (7, 3, 1)
    b = read(tmp_path / "pairs.parquet")
    assert b.prompt[2] == "a tie" and b.tie.tolist() == [False, False, True]


@pytest.mark.parametrize("table, message", [
    (pa.table({"caption": ["a"], "jpg_0": [png(RED)], "jpg_1": [png(BLUE)], "label_0": [1.0]}),
     "lacks column(s) ['label_1']"),
    (pa.table({"caption": ["a"], "jpg_0": ["x"], "jpg_1": [png(BLUE)], "label_0": [1.0], "label_1": [0.0]}),
     "column 'jpg_0' has type string, expected binary"),
])
def test_pickapic_structural_errors_name_the_file(tmp_path, table, message):
    src = tmp_path / "src.parquet"
    pq.write_table(table, src)
    with pytest.raises(PreferenceDataError, match="src.parquet") as err:
        convert_pickapic(src, tmp_path / "out.parquet")
    assert message in str(err.value) and not (tmp_path / "out.parquet").exists()


def test_pickapic_unreadable_inputs(tmp_path):
    with pytest.raises(PreferenceDataError, match="missing.parquet does not exist"):
        convert_pickapic(tmp_path / "missing.parquet", tmp_path / "out.parquet")
    src = tmp_path / "cut.parquet"
    write_pickapic(src, PICKAPIC_ROWS)
    src.write_bytes(src.read_bytes()[:-20])
    with pytest.raises(PreferenceDataError, match="cut.parquet is not a readable Parquet file"):
        convert_pickapic(src, tmp_path / "out.parquet")
    write_pickapic(src, PICKAPIC_ROWS[2:4])  # a tie (dropped) and a bad label: nothing usable
    with pytest.raises(PreferenceDataError, match=r"no usable pairs in 2 input rows .*'invalid label': 1"):
        convert_pickapic(src, tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.parquet"]


@pytest.fixture
def hpd_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "red.png").write_bytes(png(RED))
    (root / "sub" / "blue.jpg").write_bytes(jpeg(BLUE))
    (root / "broken.png").write_bytes(b"broken")
    return root


HPD_RECORDS = [
    {"prompt": "red is preferred", "path1": "sub/red.png", "path2": "sub/blue.jpg", "model1": "x", "confidence": 1},
    {"prompt": "blue is preferred", "path1": "sub/blue.jpg", "path2": "sub/red.png"},
    {"prompt": "gone", "path1": "sub/red.png", "path2": "sub/missing.png"},
    {"prompt": "broken", "path1": "broken.png", "path2": "sub/red.png"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_hpdv3_layouts(tmp_path, hpd_root, suffix):
    src = tmp_path / f"train{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(HPD_RECORDS))
    elif suffix == ".jsonl":
        src.write_text("\n".join(json.dumps(r) for r in HPD_RECORDS) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "path1", "path2")} for r in HPD_RECORDS]),
                       src)
    report = convert_hpdv3(src, hpd_root, tmp_path / "pairs.parquet")
    assert (report.rows_read, report.rows_written, report.ties) == (4, 2, 0)
    assert dict(report.skipped) == {"missing image file": 1, "undecodable image": 1}
    b = read(tmp_path / "pairs.parquet")
    assert b.prompt == ["red is preferred", "blue is preferred"] and b.source == ["hpdv3"] * 2
    assert is_red(b.image_win[0]) and is_red(b.image_lose[1])


def test_hpdv3_bad_record_names_file_and_row_and_leaves_no_output(tmp_path, hpd_root):
    src = tmp_path / "train.jsonl"
    good = HPD_RECORDS[0]
    lines = [json.dumps(good)] * 5 + [json.dumps({"prompt": "no paths"})]  # the writer has flushed batches by then
    src.write_text("\n".join(lines))
    with pytest.raises(PreferenceDataError, match=r"train.jsonl: record 5 must have keys \['prompt', 'path1', "):
        convert_hpdv3(src, hpd_root, tmp_path / "pairs.parquet", batch_size=2)
    src.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match="train.jsonl: line 2 is not valid JSON"):
        convert_hpdv3(src, hpd_root, tmp_path / "pairs.parquet")
    (tmp_path / "obj.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(PreferenceDataError, match="obj.json must hold a JSON list"):
        convert_hpdv3(tmp_path / "obj.json", hpd_root, tmp_path / "pairs.parquet")
    with pytest.raises(PreferenceDataError, match="image root .* is not a directory"):
        convert_hpdv3(src, tmp_path / "nowhere", tmp_path / "pairs.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "obj.json", "train.jsonl"]
