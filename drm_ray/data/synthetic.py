"""The built-in synthetic preference set of the tiny preset: procedurally drawn shapes with a learnable rule.

Each pair has a caption "a <colour> <shape>" over the vocabulary of `drm_ray.data.prompts` (COLOURS x SHAPES). Both
images show that shape on a plain or lightly noisy grey background, with position and size drawn independently from
the same distribution; the preferred image draws it in the named colour, the other in a different colour. Colour is
therefore the only signal, which a tiny DRM can learn in a few hundred steps. With `tie_fraction > 0` some pairs are
ties: both images draw the named colour.

Pair i depends only on (seed, i), so a set is deterministic per seed and a longer set extends a shorter one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from drm_ray.data.preferences import image_to_bytes, write_preference_parquet
from drm_ray.data.prompts import COLOURS, SHAPES

RGB = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SOURCE = "synthetic"


def draw_shape(shape: str, colour: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One image: `shape` in `colour` at a random position and size on a grey background, sometimes noisy."""
    grey = int(rng.integers(90, 166))  # mid greys: far from every named colour, white and black included
    canvas = np.full((resolution, resolution, 3), grey, dtype=np.float32)  # [H, W, 3]
    if rng.random() < 0.5:
        canvas += rng.normal(0.0, 6.0, size=canvas.shape)  # light noise, well inside the colour margins
    image = Image.fromarray(canvas.clip(0, 255).round().astype(np.uint8))
    size = rng.uniform(0.3, 0.6) * resolution
    x0, y0 = rng.uniform(0, resolution - size, size=2)
    box = (x0, y0, x0 + size, y0 + size)
    draw = ImageDraw.Draw(image)
    fill = RGB[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def iter_synthetic_pairs(n: int, resolution: int = 64, seed: int = 0, tie_fraction: float = 0.0) -> Iterator[dict]:
    """Preference rows (prompt, image_win, image_lose as PNG bytes, source, tie), one at a time."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    if not 0.0 <= tie_fraction <= 1.0:
        raise ValueError(f"tie_fraction must be in [0, 1], got {tie_fraction}")
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
        tie = bool(rng.random() < tie_fraction)
        others = [c for c in COLOURS if c != colour]
        lose_colour = colour if tie else others[rng.integers(len(others))]
        yield dict(prompt=f"a {colour} {shape}",
                   image_win=image_to_bytes(draw_shape(shape, colour, resolution, rng)),
                   image_lose=image_to_bytes(draw_shape(shape, lose_colour, resolution, rng)),
                   source=SOURCE, tie=tie)


def make_synthetic_pairs(n: int, resolution: int = 64, seed: int = 0, tie_fraction: float = 0.0) -> list[dict]:
    """`n` synthetic preference rows, deterministic per seed."""
    return list(iter_synthetic_pairs(n, resolution, seed, tie_fraction))


def write_synthetic_parquet(path: str | Path, n: int, resolution: int = 64, seed: int = 0,
                            tie_fraction: float = 0.0) -> int:
    """Write the synthetic set to a preference Parquet (atomically); returns the number of rows."""
    return write_preference_parquet(path, iter_synthetic_pairs(n, resolution, seed, tie_fraction))
