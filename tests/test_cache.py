import pytest
import torch

from drm_ray.data.cache import CacheError, PairBatch, iter_pairs, pair_rows, read_meta, write_meta, write_shard


def _batch(n, offset=0, tie_every=0):
    g = torch.Generator().manual_seed(offset)
    label = torch.ones(n)
    if tie_every:
        label[::tie_every] = 0.5
    return PairBatch(torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                     torch.randn(n, 109, 64, generator=g), torch.randn(n, 64, generator=g), label,
                     [f"p{offset + i}" for i in range(n)])


def _cache(tmp_path, shards=3, n=10, tie_every=0):
    for i in range(shards):
        write_shard(tmp_path, i, pair_rows(_batch(n, 100 * i, tie_every)))
    write_meta(tmp_path, [16, 8, 8], [109, 64], [64], {"preset": "tiny"})
    return tmp_path


def test_round_trip_and_meta(tmp_path):
    _cache(tmp_path)
    meta = read_meta(tmp_path)
    assert meta["num_rows"] == 30 and meta["num_shards"] == 3 and meta["model"] == {"preset": "tiny"}
    batches = list(iter_pairs(tmp_path, 8))
    assert [len(b) for b in batches] == [8, 8, 8, 6]
    first = _batch(10, 0)
    torch.testing.assert_close(batches[0].latent_win, first.latent_win[:8])  # latents are float32, exact
    torch.testing.assert_close(batches[0].prompt_embeds, first.prompt_embeds[:8], atol=2e-3, rtol=1e-3)  # fp16
    assert batches[0].prompt == [f"p{i}" for i in range(8)]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left


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


def test_incomplete_or_empty_cache_is_named(tmp_path):
    write_shard(tmp_path, 0, pair_rows(_batch(4)))
    with pytest.raises(CacheError, match="no meta.json"):
        next(iter_pairs(tmp_path, 2))
    ties = tmp_path / "ties"
    write_shard(ties, 0, pair_rows(_batch(4, tie_every=1)))
    write_meta(ties, [16, 8, 8], [109, 64], [64])
    with pytest.raises(CacheError, match="every pair is a tie"):
        next(iter_pairs(ties, 2, drop_ties=True, loop=True))


def test_a_single_shard_still_feeds_every_rank(tmp_path):
    _cache(tmp_path, shards=1, n=9)
    ranks = [[p for b in iter_pairs(tmp_path, 2, rank=r, world_size=2) for p in b.prompt] for r in range(2)]
    assert ranks[0] == ["p0", "p2", "p4", "p6", "p8"] and ranks[1] == ["p1", "p3", "p5", "p7"]
