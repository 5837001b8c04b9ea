"""The preference Parquet: round trip, batched reading, every kind of bad input, and atomic writes."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drm_ray.data.preferences import (
    PreferenceDataError, PreferenceReader, decode_image, image_to_bytes, preference_files, write_preference_parquet,
)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def png(colour, size=(24, 24)) -> bytes:
    return image_to_bytes(Image.new("RGB", size, colour))


def pair_rows(n):
    return [dict(prompt=f"prompt {i}", image_win=png(RED), image_lose=png(BLUE, (40, 20)), source="test",
                 tie=i % 3 == 0) for i in range(n)]


def read_all(path, batch_size=4, resolution=8, **kw):
    reader = PreferenceReader(path, **kw)
    return reader, list(reader.iter_batches(batch_size, resolution))


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_round_trip_decodes_resizes_and_keeps_columns(tmp_path):
    path = tmp_path / "pairs.parquet"
    assert write_preference_parquet(path, pair_rows(7), batch_size=3) == 7
    reader, batches = read_all(path, batch_size=3)
    assert reader.num_rows == 7 and [len(b) for b in batches] == [3, 3, 1]
    assert [g[1:] for g in reader.row_groups()] == [(0, 3), (3, 3), (6, 1)]  # one row group per written batch
    b = batches[0]
    assert b.image_win.shape == (3, 3, 8, 8) and b.image_win.dtype == torch.float32
    # solid colours survive PNG + resizing exactly: red win, blue lose
    assert torch.equal(b.image_win[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(b.image_lose[1, :, 3, 3], torch.tensor([0.0, 0.0, 1.0]))
    assert b.prompt == ["prompt 0", "prompt 1", "prompt 2"] and b.source == ["test"] * 3
    assert b.tie.tolist() == [True, False, False] and batches[2].row_index == [6]
    assert leftovers(tmp_path) == []


def test_reader_accepts_only_the_required_columns(tmp_path):
    path = tmp_path / "minimal.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "image_win": [png(RED)], "image_lose": [png(BLUE)]}), path)
    reader, [b] = read_all(path)
    assert not reader.has_tie and b.tie.tolist() == [False] and b.source == [""]


def test_soft_labels_round_trip_and_bad_labels_are_named(tmp_path):
    rows = [dict(prompt="a", image_win=png(RED), image_lose=png(BLUE), label=0.8), dict(prompt="b",
            image_win=png(RED), image_lose=png(BLUE)), dict(prompt="c", image_win=png(RED), image_lose=png(BLUE),
                                                           tie=True)]
    path = tmp_path / "soft.parquet"
    write_preference_parquet(path, rows)
    _, [b] = read_all(path)
    assert b.label.tolist() == pytest.approx([0.8, 1.0, 0.5]) and b.tie.tolist() == [False, False, True]
    for label, message in ((0.3, r"label must be in \(0.5, 1\]"), (float("nan"), "label must be in"),
                           ("high", "label must be a number")):
        with pytest.raises(PreferenceDataError, match=rf"bad.parquet: row 1: {message}"):
            write_preference_parquet(tmp_path / "bad.parquet", [rows[1], {**rows[1], "label": label}])
    with pytest.raises(PreferenceDataError, match="row 0: a tie has no label"):
        write_preference_parquet(tmp_path / "bad.parquet", [{**rows[2], "label": 0.7}])
    assert not (tmp_path / "bad.parquet").exists()
    # a file written by another tool: the reader names the row and column of a bad label
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "image_win": [png(RED)] * 2, "image_lose": [png(BLUE)] * 2,
                             "label": [0.9, 0.5]}), other)
    with pytest.raises(PreferenceDataError, match=r"other.parquet: row 1, column label: label must be in"):
        read_all(other)
    pq.write_table(pa.table({"prompt": ["a"], "image_win": [png(RED)], "image_lose": [png(BLUE)], "label": ["x"]}),
                   other)
    with pytest.raises(PreferenceDataError, match="column 'label' has type string, expected float"):
        PreferenceReader(other)


def test_decode_image_is_rgb_square_in_unit_range_and_crops_instead_of_squashing():
    grey = image_to_bytes(Image.new("L", (30, 10), 128))
    x = decode_image(grey, 16)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 128 / 255))
    stripes = Image.new("RGB", (30, 10), RED)  # red | blue | green thirds: the centre square is all blue
    stripes.paste(BLUE, (10, 0, 20, 10))
    stripes.paste(GREEN, (20, 0, 30, 10))
    x = decode_image(image_to_bytes(stripes), 4)
    # squashed, the outer columns would be red and green; cropped they are blue up to the filter's reach (~6%)
    assert (x[2] > 0.9).all() and (x[:2] < 0.1).all()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.write_text("prompt,image\nx,y\n"), "not a readable Parquet file"),
    (lambda p: pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "image_win": pa.array([], pa.binary()),
                                        "image_lose": pa.array([], pa.binary())}), p), "holds no rows"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "image_win": [png(RED)]}), p),
     "lacks column(s) ['image_lose']"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "image_win": ["not bytes"], "image_lose": [png(RED)]}), p),
     "column 'image_win' has type string, expected binary"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "image_win": [png(RED)], "image_lose": [png(RED)],
                                        "tie": [1]}), p), "column 'tie' has type int64, expected bool"),
])
def test_bad_files_are_rejected_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.parquet"
    make(path)
    with pytest.raises(PreferenceDataError, match="bad.parquet") as err:
        PreferenceReader(path)
    assert message in str(err.value)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, pair_rows(5))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(PreferenceDataError, match="pairs.parquet is not a readable Parquet file"):
            PreferenceReader(path)


def test_corrupt_page_behind_intact_footer_is_named(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, pair_rows(5))
    data = bytearray(path.read_bytes())
    data[4:68] = b"\xff" * 64  # the first page header; the footer still opens
    path.write_bytes(bytes(data))
    reader = PreferenceReader(path)
    with pytest.raises(PreferenceDataError, match="pairs.parquet is unreadable past its footer"):
        list(reader.iter_batches(4, 8))


def test_undecodable_image_names_file_row_and_column(tmp_path):
    rows = pair_rows(6)
    rows[4]["image_lose"] = b"\x89PNG but not really"
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, rows)
    with pytest.raises(PreferenceDataError, match=r"pairs.parquet: row 4, column image_lose: cannot decode"):
        read_all(path)


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    rows = pair_rows(6)
    rows[1]["image_win"] = b"garbage"
    rows[4]["image_lose"] = png(RED)[:20]  # a truncated PNG
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, rows)
    with caplog.at_level(logging.WARNING, logger="drm_ray.data.preferences"):
        reader, batches = read_all(path, batch_size=3, on_bad_image="skip")
    assert reader.skipped_rows == [1, 4]
    assert [b.row_index for b in batches] == [[0, 2], [3, 5]]
    assert "skipped 2 of 6 rows" in caplog.text


def test_null_prompt_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", None], "image_win": [png(RED)] * 2, "image_lose": [png(BLUE)] * 2}),
                   path)
    with pytest.raises(PreferenceDataError, match="row 1, column prompt"):
        read_all(path)
    with pytest.raises(PreferenceDataError, match="row 1, column prompt"):
        PreferenceReader(path).check_prompts()


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, pair_rows(2))
    before = path.read_bytes()

    def rows_then_failure():
        yield from pair_rows(5)  # more than one batch reaches the temporary file first
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_preference_parquet(path, rows_then_failure(), batch_size=2)
    bad = pair_rows(3)
    bad[2]["image_win"] = "not bytes"
    with pytest.raises(PreferenceDataError, match="row 2: image_win must be non-empty encoded image bytes"):
        write_preference_parquet(path, bad, batch_size=2)
    with pytest.raises(PreferenceDataError, match="row 0: unknown keys"):
        write_preference_parquet(path, [dict(pair_rows(1)[0], image_winner=b"x")])
    with pytest.raises(PreferenceDataError, match="no rows to write"):
        write_preference_parquet(tmp_path / "empty.parquet", [])
    assert path.read_bytes() == before and not (tmp_path / "empty.parquet").exists()
    assert leftovers(tmp_path) == []


def test_input_is_a_file_a_directory_or_a_glob(tmp_path):
    for name in ("b.parquet", "a.parquet", "notes.parquet.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.parquet").mkdir()  # a directory named like a file is not an input
    assert preference_files(tmp_path) == [tmp_path / "a.parquet", tmp_path / "b.parquet"]  # sorted
    assert preference_files(tmp_path / "*.parquet") == [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    assert preference_files(tmp_path / "b.parquet") == [tmp_path / "b.parquet"]
    assert preference_files(tmp_path / "missing.parquet") == [tmp_path / "missing.parquet"]  # fails when opened
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreferenceDataError, match="holds no \\*.parquet files"):
        preference_files(tmp_path / "empty")
    with pytest.raises(PreferenceDataError, match="matches no files"):
        preference_files(tmp_path / "c*.parquet")


def test_prompts_stream_in_file_order_and_blank_ones_are_named(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_preference_parquet(path, pair_rows(5), batch_size=2)
    assert list(PreferenceReader(path).iter_prompts(batch_size=3)) == [f"prompt {i}" for i in range(5)]
    pq.write_table(pa.table({"prompt": ["a", None], "image_win": [b"x"] * 2, "image_lose": [b"y"] * 2}), path)
    with pytest.raises(PreferenceDataError, match="row 1, column prompt"):
        list(PreferenceReader(path).iter_prompts())
