"""Preprocessing a preference Parquet into the embedding cache through Ray Data (a real local Ray)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import drm_ray.data.preprocess as preprocess
from drm_ray.config import load_config
from drm_ray.data.cache import CacheError, PairBatch, iter_pairs, pair_rows, read_meta, write_meta, write_shard
from drm_ray.data.preferences import PreferenceDataError, PreferenceReader, write_preference_parquet
from drm_ray.data.preprocess import ensure_synthetic_cache, preprocess_pairs
from drm_ray.data.synthetic import make_synthetic_pairs, write_synthetic_parquet
from drm_ray.diffusion.sampling import encode_images
from drm_ray.models.sd3 import encode_prompts, model_kwargs

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
    monkeypatch.setattr(preprocess.ray.data, "from_items", tripwire)


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
    with pytest.raises(ValueError, match="model_kwargs lacks"):
        preprocess_pairs(pairs, tmp_path / "new", preset="tiny", model_kwargs={"seed": 0})


@pytest.mark.slow
def test_synthetic_cache_matches_direct_encoding_and_keeps_ties(tmp_path, ray_session, tiny):
    cache_dir = tmp_path / "cache"
    ensure_synthetic_cache(cache_dir, n=10, seed=5, model_kwargs=TINY, tie_fraction=0.3, batch_size=4, shard_rows=4)
    meta = read_meta(cache_dir)
    assert (meta["latent_shape"], meta["embed_shape"], meta["pooled_shape"]) == ([16, 8, 8], [109, 64], [64])
    assert meta["num_rows"] == 10 and meta["num_shards"] == 3 and meta["model"] == {"preset": "tiny", **TINY}
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
