import json
import threading
import time

import pytest
import torch

from drm_ray.data.cache import CacheError, PairBatch, iter_pairs, pair_rows, read_meta, write_meta, write_shard


def _batch(n, offset=0, tie_every=0, prompts=None):
    g = torch.Generator().manual_seed(offset)
    label = torch.ones(n)
    if tie_every:
        label[::tie_every] = 0.5
    names = [f"p{offset + i}" for i in range(n)] if prompts is None else [f"p{offset + i % prompts}" for i in range(n)]
    embeds = {p: (torch.randn(109, 64, generator=g), torch.randn(64, generator=g)) for p in dict.fromkeys(names)}
    return PairBatch(torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                     torch.stack([embeds[p][0] for p in names]), torch.stack([embeds[p][1] for p in names]), label,
                     names)


def _cache(tmp_path, shards=3, n=10, tie_every=0, prompts=None, latent_dtype="float32"):
    for i in range(shards):
        write_shard(tmp_path, i, pair_rows(_batch(n, 100 * i, tie_every, prompts), latent_dtype=latent_dtype))
    write_meta(tmp_path, [16, 8, 8], [109, 64], [64], {"preset": "tiny"})
    return tmp_path


def test_round_trip_and_meta(tmp_path):
    _cache(tmp_path)
    meta = read_meta(tmp_path)
    assert meta["num_rows"] == 30 and meta["num_shards"] == 3 and meta["model"] == {"preset": "tiny"}
    assert meta["format_version"] == 2 and meta["num_prompts"] == 30 and meta["latent_dtype"] == "float32"
    batches = list(iter_pairs(tmp_path, 8))
    assert [len(b) for b in batches] == [8, 8, 8, 6]
    first = _batch(10, 0)
    torch.testing.assert_close(batches[0].latent_win, first.latent_win[:8], rtol=0, atol=0)  # float32: exact
    # the prompt table stores float16: the values come back exactly as float16 rounded them
    assert torch.equal(batches[0].prompt_embeds, first.prompt_embeds[:8].half().float())
    assert torch.equal(batches[0].pooled, first.pooled[:8].half().float())
    assert batches[0].prompt == [f"p{i}" for i in range(8)]
    hidden = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert hidden == []  # no temporary files left


def test_bytes_grow_with_distinct_prompts_not_with_pairs(tmp_path):
    few = read_meta(_cache(tmp_path / "few", shards=1, n=40, prompts=2))
    many = read_meta(_cache(tmp_path / "many", shards=1, n=40))
    assert (few["num_prompts"], many["num_prompts"], few["num_rows"], many["num_rows"]) == (2, 40, 40, 40)
    # per prompt: (109 * 64 + 64) float16 = 14 080 B, plus its id and text in the part and in the index (< 100 B)
    per_prompt = (109 * 64 + 64) * 2
    assert 38 * per_prompt <= many["prompt_bytes"] - few["prompt_bytes"] <= 38 * (per_prompt + 100)
    assert 2 * per_prompt <= few["prompt_bytes"] <= 2 * per_prompt + 8_000  # + Parquet footers and .npy headers
    # per pair: 2 latents of 16 * 8 * 8 float32 = 8 192 B (random: Parquet's compression cannot shrink them)
    for meta in (few, many):
        assert 40 * 8192 <= meta["pair_bytes"] <= 40 * (8192 + 100) + 4_000
    # format 1 stored the embeddings per pair: 40 * (8 192 + 14 080) B; format 2 with 2 prompts is 2.4x smaller
    assert few["pair_bytes"] + few["prompt_bytes"] < 40 * (8192 + per_prompt) / 2.4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_latents_round_trip_and_halve_the_latent_bytes(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    full = read_meta(_cache(tmp_path / "fp32"))
    half = read_meta(_cache(tmp_path / name, latent_dtype=name))
    assert half["latent_dtype"] == name
    # 30 pairs x 2 latents x 1024 values: 4 bytes each, then 2
    assert full["pair_bytes"] - half["pair_bytes"] == pytest.approx(30 * 2 * 1024 * 2, rel=0.02)
    got = torch.cat([b.latent_win for b in iter_pairs(tmp_path / name, 8)])  # [30, 16, 8, 8] float32
    want = torch.cat([_batch(10, 100 * i).latent_win for i in range(3)])
    assert got.dtype == torch.float32 and torch.equal(got, want.to(dtype).float())  # exactly the rounded values
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # half an ulp, relative
    assert ((got - want).abs() <= eps * want.abs() + 1e-6).all()


def test_prefetching_reader_yields_what_the_synchronous_one_does(tmp_path):
    _cache(tmp_path, prompts=4, tie_every=3)

    def take(prefetch, **kw):
        it = iter_pairs(tmp_path, 7, prefetch=prefetch, **kw)
        return [next(it) for _ in range(8)] if kw.get("loop") else list(it)

    for kw in ({}, {"seed": 3, "loop": True, "drop_ties": True}, {"rank": 1, "world_size": 2}):
        sync, ahead = take(0, **kw), take(3, **kw)
        assert len(sync) == len(ahead)
        for a, b in zip(sync, ahead):
            assert a.prompt == b.prompt and torch.equal(a.label, b.label)
            for name in ("latent_win", "latent_lose", "prompt_embeds", "pooled"):
                assert torch.equal(getattr(a, name), getattr(b, name))


def test_prefetch_thread_surfaces_errors_and_stops_when_closed(tmp_path):
    _cache(tmp_path)
    (tmp_path / "prompts" / "part-00001.embeds.npy").unlink()  # shard 1's prompts lose their embeddings
    it = iter_pairs(tmp_path, 10, prefetch=2)
    assert next(it).prompt == [f"p{i}" for i in range(10)]  # shard 0 decodes; shard 1 fails in the thread
    with pytest.raises(FileNotFoundError, match="part-00001.embeds.npy"):
        next(it)
    looping = iter_pairs(tmp_path, 4, loop=True, prefetch=2)
    next(looping)
    looping.close()  # the consumer stops early: the producer thread must not run on forever
    deadline = time.monotonic() + 5
    while any(t.name == "iter_pairs-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "iter_pairs-prefetch" for t in threading.enumerate())


def test_ranks_get_disjoint_shares_and_ties_drop(tmp_path):
    _cache(tmp_path, tie_every=5)
    r0 = [p for b in iter_pairs(tmp_path, 4, rank=0, world_size=2) for p in b.prompt]
    r1 = [p for b in iter_pairs(tmp_path, 4, rank=1, world_size=2) for p in b.prompt]
    assert not set(r0) & set(r1) and len(r0) + len(r1) == 30
    kept = [b for b in iter_pairs(tmp_path, 4, drop_ties=True)]
    assert sum(len(b) for b in kept) == 24 and all((b.label == 1.0).all() for b in kept)


def test_shuffled_loop_is_seeded(tmp_path):
    _cache(tmp_path)

    def take(seed):
        it = iter_pairs(tmp_path, 7, seed=seed, loop=True)
        return [p for _ in range(10) for p in next(it).prompt]  # 70 rows: more than one epoch

    assert take(1) == take(1) and take(1) != take(2)
    assert sorted(set(take(1))) == sorted(f"p{100 * s + i}" for s in range(3) for i in range(10))


def test_incomplete_inconsistent_or_old_cache_is_named(tmp_path):
    write_shard(tmp_path, 0, pair_rows(_batch(4)))
    with pytest.raises(CacheError, match="no meta.json"):
        next(iter_pairs(tmp_path, 2))
    ties = tmp_path / "ties"
    write_shard(ties, 0, pair_rows(_batch(4, tie_every=1)))
    write_meta(ties, [16, 8, 8], [109, 64], [64])
    with pytest.raises(CacheError, match="every pair is a tie"):
        next(iter_pairs(ties, 2, drop_ties=True, loop=True))
    for part in (tmp_path / "prompts").glob("part-00000.*"):  # a pair whose prompt has no embeddings
        part.unlink()
    with pytest.raises(CacheError, match="have no embeddings"):
        write_meta(tmp_path, [16, 8, 8], [109, 64], [64])
    old = tmp_path / "v1"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"latent_shape": [16, 8, 8], "num_rows": 3}))
    with pytest.raises(CacheError, match="format 1"):
        next(iter_pairs(old, 2))


def test_a_single_shard_still_feeds_every_rank(tmp_path):
    _cache(tmp_path, shards=1, n=9)
    ranks = [[p for b in iter_pairs(tmp_path, 2, rank=r, world_size=2) for p in b.prompt] for r in range(2)]
    assert ranks[0] == ["p0", "p2", "p4", "p6", "p8"] and ranks[1] == ["p1", "p3", "p5", "p7"]
