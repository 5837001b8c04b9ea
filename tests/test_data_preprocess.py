"""Preprocessing a preference Parquet into the embedding cache through Ray Data (a real local Ray)."""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import drm_ray.data.preprocess as preprocess
from drm_ray.config import load_config
from drm_ray.data.cache import CacheError, PairBatch, iter_pairs, pair_rows, read_meta, write_meta, write_shard
from drm_ray.data.preferences import PreferenceDataError, PreferenceReader, write_preference_parquet
from drm_ray.data.preprocess import (PartSummary, ShardSummary, cache_dir_for, encoder_options,
                                     ensure_synthetic_cache, preprocess_pairs)
from drm_ray.data.synthetic import make_synthetic_pairs, write_synthetic_parquet
from drm_ray.diffusion.sampling import encode_images
from drm_ray.models.sd3 import encode_prompts, model_kwargs
from drm_ray.placement import ClusterResourcesError

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset's model: seed 0, 64 px, 32 T5 tokens, like the `tiny` fixture (whose VAE and text encoders it uses).
TINY = model_kwargs(load_config("tiny").model, load_config("tiny").sampling)


def cache_rows(cache_dir):
    return next(iter_pairs(cache_dir, batch_size=1000))  # the whole (small) cache in one batch


def _write(path, rows):
    write_preference_parquet(path, rows)
    return path


def hidden_leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


@pytest.fixture
def no_ray_work(monkeypatch):
    """Fail the test if preprocessing reaches Ray (bad input must be rejected before)."""
    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was reached before the input was rejected")
    monkeypatch.setattr(preprocess, "init_ray", tripwire)
    monkeypatch.setattr(preprocess, "ensure_resources", tripwire)
    monkeypatch.setattr(preprocess.ray, "remote", tripwire)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"PAR1 cut"), "not a readable Parquet file"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "image_win": [b"x"]}), p), "lacks column(s)"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a", " "], "image_win": [b"x"] * 2, "image_lose": [b"y"] * 2}),
                              p), "row 1, column prompt"),
])
def test_bad_input_fails_before_any_ray_work(tmp_path, no_ray_work, make, message):
    path = tmp_path / "pairs.parquet"
    make(path)
    with pytest.raises(PreferenceDataError, match="pairs.parquet") as err:
        preprocess_pairs(path, tmp_path / "cache", preset="tiny", model_kwargs=TINY)
    assert message in str(err.value) and not (tmp_path / "cache").exists()


def test_a_bad_file_in_a_directory_is_named_before_any_ray_work(tmp_path, no_ray_work):
    write_synthetic_parquet(tmp_path / "pairs" / "a.parquet", 3)
    pq.write_table(pa.table({"prompt": ["x", ""], "image_win": [b"x"] * 2, "image_lose": [b"y"] * 2}),
                   tmp_path / "pairs" / "b.parquet")
    with pytest.raises(PreferenceDataError, match=r"b.parquet: row 1, column prompt"):
        preprocess_pairs(tmp_path / "pairs", tmp_path / "cache", preset="tiny", model_kwargs=TINY)
    with pytest.raises(PreferenceDataError, match="matches no files"):
        preprocess_pairs(tmp_path / "pairs" / "c*.parquet", tmp_path / "cache", preset="tiny", model_kwargs=TINY)
    with pytest.raises(ValueError, match="latent_dtype must be one of"):
        preprocess_pairs(tmp_path / "pairs" / "a.parquet", tmp_path / "cache", preset="tiny", model_kwargs=TINY,
                         latent_dtype="int8")
    assert not (tmp_path / "cache").exists()


def test_cache_dir_is_keyed_on_every_input_file_and_the_latent_dtype(tmp_path):
    write_synthetic_parquet(tmp_path / "pairs" / "a.parquet", 2)
    key = cache_dir_for(tmp_path / "pairs", tmp_path / "root", "tiny", TINY)
    assert key == cache_dir_for(tmp_path / "pairs", tmp_path / "root", "tiny", TINY) and key.name.startswith("pairs-")
    assert key != cache_dir_for(tmp_path / "pairs", tmp_path / "root", "tiny", TINY, "bfloat16")
    write_synthetic_parquet(tmp_path / "pairs" / "b.parquet", 2)  # a second file joins the input
    assert key != cache_dir_for(tmp_path / "pairs", tmp_path / "root", "tiny", TINY)
    data = load_config("sd35m").data
    assert encoder_options(data) == dict(concurrency=4, num_gpus=1, batch_size=32, shard_rows=1024,
                                         latent_dtype="bfloat16", autoscale_wait_s=0.0)


def test_refuses_to_overwrite_before_any_ray_work(tmp_path, no_ray_work):
    pairs = tmp_path / "pairs.parquet"
    write_synthetic_parquet(pairs, 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not an embedding cache"):
        preprocess_pairs(pairs, tmp_path / "other", preset="tiny", model_kwargs=TINY)
    z = torch.zeros(1, 2)
    write_shard(tmp_path / "done", 0, pair_rows(PairBatch(z, z, z[:, None], z, torch.ones(1), ["p"])))
    write_meta(tmp_path / "done", [2], [1, 2], [2])
    with pytest.raises(CacheError, match="already holds a complete cache"):
        preprocess_pairs(pairs, tmp_path / "done", preset="tiny", model_kwargs=TINY)
    with pytest.raises(PreferenceDataError, match="does not exist"):  # overwrite, but the input is bad: kept
        preprocess_pairs(tmp_path / "nope.parquet", tmp_path / "done", preset="tiny", model_kwargs=TINY,
                         overwrite=True)
    assert read_meta(tmp_path / "done")["num_rows"] == 1
    with pytest.raises(ValueError, match="model_kwargs lacks"):
        preprocess_pairs(pairs, tmp_path / "new", preset="tiny", model_kwargs={"seed": 0})


@pytest.mark.slow
def test_synthetic_cache_matches_direct_encoding_and_keeps_ties(tmp_path, ray_session, tiny):
    cache_dir = tmp_path / "cache"
    ensure_synthetic_cache(cache_dir, n=10, seed=5, model_kwargs=TINY, tie_fraction=0.3, batch_size=4, shard_rows=4)
    meta = read_meta(cache_dir)
    assert (meta["latent_shape"], meta["embed_shape"], meta["pooled_shape"]) == ([16, 8, 8], [109, 64], [64])
    assert meta["num_rows"] == 10 and meta["num_shards"] == 3 and meta["model"] == {"preset": "tiny", **TINY}
    assert meta["num_prompts"] == len({r["prompt"] for r in make_synthetic_pairs(10, seed=5)})
    assert hidden_leftovers(tmp_path) == []

    got = cache_rows(cache_dir)
    rows = make_synthetic_pairs(10, resolution=64, seed=5, tie_fraction=0.3)
    assert got.prompt == [r["prompt"] for r in rows]  # shards follow the input order
    assert got.label.tolist() == [0.5 if r["tie"] else 1.0 for r in rows] and 0 < (got.label == 0.5).sum() < 10
    images = next(PreferenceReader(_write(tmp_path / "again.parquet", rows)).iter_batches(10, 64))
    assert torch.allclose(got.latent_win, encode_images(tiny.vae, images.image_win), atol=1e-5)  # [10, 16, 8, 8]
    assert torch.allclose(got.latent_lose, encode_images(tiny.vae, images.image_lose), atol=1e-5)
    embeds, pooled = encode_prompts(tiny, got.prompt, 32)  # [10, 109, 64], [10, 64]
    assert torch.allclose(got.prompt_embeds, embeds, atol=1e-2, rtol=1e-2)  # stored as float16
    assert torch.allclose(got.pooled, pooled, atol=1e-2, rtol=1e-2)

    mtime = (cache_dir / "meta.json").stat().st_mtime_ns
    ensure_synthetic_cache(cache_dir, n=10, seed=5, model_kwargs=TINY, tie_fraction=0.3)  # present: not rebuilt
    assert (cache_dir / "meta.json").stat().st_mtime_ns == mtime
    with pytest.raises(CacheError, match="synthetic.seed: cache has 5, wanted 6"):
        ensure_synthetic_cache(cache_dir, n=10, seed=6, model_kwargs=TINY, tie_fraction=0.3)
    with pytest.raises(CacheError, match="model.resolution: cache has 64, wanted 32"):
        ensure_synthetic_cache(cache_dir, n=10, seed=5, model_kwargs={**TINY, "resolution": 32}, tie_fraction=0.3)


@pytest.mark.slow
def test_undecodable_image_fails_naming_file_and_row_and_leaves_no_cache(tmp_path, ray_session):
    rows = make_synthetic_pairs(6, seed=1)
    rows[4]["image_lose"] = b"not a png"
    pairs = tmp_path / "pairs.parquet"  # only the required columns: the reading stage fills in source and tie
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "image_win", "image_lose")} for r in rows]),
                   pairs)
    with pytest.raises(PreferenceDataError, match=r"pairs.parquet: row 4, column image_lose: cannot decode"):
        preprocess_pairs(pairs, tmp_path / "cache", preset="tiny", model_kwargs=TINY, batch_size=4)
    assert not (tmp_path / "cache").exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_soft_labels_reach_the_cache_and_training_drops_only_ties(tmp_path, ray_session):
    rows = make_synthetic_pairs(4, seed=3)
    rows[0]["label"], rows[1]["tie"], rows[3]["label"] = 0.7, True, 0.95
    pairs = _write(tmp_path / "pairs.parquet", rows)
    preprocess_pairs(pairs, tmp_path / "cache", preset="tiny", model_kwargs=TINY, batch_size=4)
    assert cache_rows(tmp_path / "cache").label.tolist() == pytest.approx([0.7, 0.5, 1.0, 0.95])
    kept = next(iter_pairs(tmp_path / "cache", batch_size=10, drop_ties=True))
    assert kept.label.tolist() == pytest.approx([0.7, 1.0, 0.95])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "image_win", "image_lose")} | {"label": 0.4}
                                         for r in rows]), bad)
    with pytest.raises(PreferenceDataError, match=r"bad.parquet: row 0, column label: label must be in"):
        preprocess_pairs(bad, tmp_path / "cache2", preset="tiny", model_kwargs=TINY, batch_size=4)
    assert not (tmp_path / "cache2").exists()


@pytest.mark.slow
def test_job_skips_bad_rows_on_request(tmp_path, ray_session):
    rows = make_synthetic_pairs(7, seed=2, tie_fraction=0.4)
    rows[1]["image_win"] = b"garbage"
    pairs = _write(tmp_path / "pairs.parquet", rows)
    out = tmp_path / "cache"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # join the test's Ray
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--pairs", str(pairs), "--out", str(out),
                           "--on-bad-image", "skip", "--batch-size", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ties = sum(r["tie"] for i, r in enumerate(rows) if i != 1)
    assert f"wrote 6 pairs ({ties} ties, 1 skipped) of 7" in proc.stdout
    got = cache_rows(out)
    assert got.prompt == [r["prompt"] for i, r in enumerate(rows) if i != 1]
    assert json.loads((out / "preprocess.json").read_text())["skipped_rows"] == [1]


@pytest.mark.slow
def test_directory_of_files_makes_one_cache_and_the_driver_sees_only_summaries(tmp_path, ray_session, tiny,
                                                                              monkeypatch):
    a, b = make_synthetic_pairs(7, seed=1, tie_fraction=0.3), make_synthetic_pairs(5, seed=2)
    for i, row in enumerate(b):
        row["prompt"] = a[i % 3]["prompt"]  # prompts repeat across files
    write_preference_parquet(tmp_path / "pairs" / "b.parquet", b, batch_size=2)  # row groups of 2, 2, 1
    write_preference_parquet(tmp_path / "pairs" / "a.parquet", a, batch_size=3)  # 3, 3, 1
    received = []  # everything the encoder actors send the driver passes through _run
    real_run = preprocess._run

    def spy(*args):
        results = real_run(*args)
        received.extend(results)
        return results

    monkeypatch.setattr(preprocess, "_run", spy)

    def build(out, concurrency):
        return preprocess_pairs(tmp_path / "pairs", out, preset="tiny", model_kwargs=TINY, concurrency=concurrency,
                                batch_size=2, shard_rows=2, latent_dtype="bfloat16")

    stats = build(tmp_path / "cache", concurrency=2)
    distinct = list(dict.fromkeys(r["prompt"] for r in a + b))
    assert (stats.rows_written, stats.prompts, stats.ties) == (12, len(distinct), sum(r["tie"] for r in a))
    assert all(type(s) in (PartSummary, ShardSummary) and len(pickle.dumps(s)) < 1000 for s in received)
    assert sum(s.prompts for s in received if isinstance(s, PartSummary)) == len(distinct)  # each encoded once
    meta = read_meta(tmp_path / "cache")
    assert (meta["num_rows"], meta["num_prompts"], meta["latent_dtype"]) == (12, len(distinct), "bfloat16")
    # names come from (file, row group, shard within it): a's groups hold 3, 3, 1 rows -> 2, 2, 1 shards of <= 2
    names = sorted(p.name for p in (tmp_path / "cache").glob("shard-*"))
    assert names == [f"shard-{f:04d}-{g:05d}-{k:04d}.parquet" for f, g, k in
                     [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0)]]
    got = cache_rows(tmp_path / "cache")
    assert got.prompt == [r["prompt"] for r in a + b]  # file order (sorted names), then row order
    images = next(PreferenceReader(tmp_path / "pairs" / "a.parquet").iter_batches(7, 64))
    want = encode_images(tiny.vae, images.image_win)  # [7, 16, 8, 8]
    assert torch.allclose(got.latent_win[:7], want, rtol=2 ** -7, atol=1e-5)  # within bf16 precision

    build(tmp_path / "again", concurrency=1)  # another actor count, another schedule: the same cache
    assert sorted(p.name for p in (tmp_path / "again").glob("shard-*")) == names
    again = cache_rows(tmp_path / "again")
    assert again.prompt == got.prompt and torch.equal(again.latent_win, got.latent_win)
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_gpu_encoders_on_a_cpu_cluster_fail_at_once_naming_them(tmp_path, ray_session):
    pairs = tmp_path / "pairs.parquet"
    write_synthetic_parquet(pairs, 2)
    start = time.monotonic()
    with pytest.raises(ClusterResourcesError, match=r"encoder actors: one actor needs \{CPU: 1, GPU: 1\}"):
        preprocess_pairs(pairs, tmp_path / "cache", preset="tiny", model_kwargs=TINY, num_gpus=1)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cache").exists() and hidden_leftovers(tmp_path) == []
