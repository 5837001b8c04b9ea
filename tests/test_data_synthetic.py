"""The built-in synthetic preference set: deterministic per seed, and the winner follows the caption's colour."""

import numpy as np
import pytest

from drm_ray.data.preferences import PreferenceReader, decode_image
from drm_ray.data.prompts import BUILTIN_PROMPTS
from drm_ray.data.synthetic import RGB, make_synthetic_pairs, write_synthetic_parquet


def pixels(data: bytes) -> np.ndarray:
    return decode_image(data, 64).permute(1, 2, 0).reshape(-1, 3).numpy()  # [H * W, 3] in [0, 1]


def named_colour(prompt: str) -> np.ndarray:
    return np.array(RGB[prompt.split()[1]]) / 255.0


def foreground_mean(px: np.ndarray) -> np.ndarray:
    """Mean colour of the shape: the pixels far from the (median) background; the shape covers < 40% of the image."""
    bg = np.median(px, axis=0)
    return px[np.linalg.norm(px - bg, axis=1) > 0.15].mean(axis=0)


def test_deterministic_per_seed_and_prefix_stable():
    a, b = make_synthetic_pairs(6, seed=3), make_synthetic_pairs(6, seed=3)
    assert a == b
    assert make_synthetic_pairs(3, seed=3) == a[:3]  # pair i depends only on (seed, i)
    assert make_synthetic_pairs(6, seed=4) != a


def test_winner_shows_the_named_colour_and_loser_does_not():
    rows = make_synthetic_pairs(48, seed=0)
    assert all(r["prompt"] in BUILTIN_PROMPTS and r["source"] == "synthetic" and not r["tie"] for r in rows)
    for r in rows:
        colour = named_colour(r["prompt"])
        win, lose = pixels(r["image_win"]), pixels(r["image_lose"])
        d_win = np.linalg.norm(foreground_mean(win) - colour)
        d_lose = np.linalg.norm(foreground_mean(lose) - colour)
        assert d_win < 0.05 < d_lose, r["prompt"]
        # the smallest shape (a triangle 0.3 x 64 px wide) covers about 4.5% of the image
        assert (np.linalg.norm(win - colour, axis=1) < 0.15).mean() > 0.02
        assert (np.linalg.norm(lose - colour, axis=1) < 0.15).mean() == 0


def test_ties_show_the_named_colour_twice():
    rows = make_synthetic_pairs(40, seed=1, tie_fraction=0.5)
    ties = [r for r in rows if r["tie"]]
    assert 5 < len(ties) < 35
    for r in ties:
        colour = named_colour(r["prompt"])
        assert all(np.linalg.norm(foreground_mean(pixels(r[k])) - colour) < 0.05 for k in ("image_win", "image_lose"))


def test_written_set_reads_back(tmp_path):
    path = tmp_path / "synthetic.parquet"
    assert write_synthetic_parquet(path, 10, resolution=32, seed=2, tie_fraction=0.3) == 10
    reader = PreferenceReader(path)
    [batch] = list(reader.iter_batches(16, 32))
    rows = make_synthetic_pairs(10, resolution=32, seed=2, tie_fraction=0.3)
    assert batch.prompt == [r["prompt"] for r in rows] and batch.tie.tolist() == [r["tie"] for r in rows]
    assert batch.image_win.shape == (10, 3, 32, 32)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=2, resolution=4), dict(n=2, tie_fraction=1.5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_synthetic_pairs(**kwargs)
