"""The toy world's scenes: captions over a small vocabulary and the 32x32 images that show them, made in code.

A scene is one shape at a named position ("a red circle on the left") or two shapes of one kind anywhere
("two blue squares"): 5 colours x 3 shapes x (5 positions + a count of two) = 90 captions. Images are drawn on a
black background with 4x supersampled anti-aliasing; size, exact position (jitter around the named anchor) and a
faint colour jitter vary per image. Scene i of a seed depends only on (seed, i), so a dataset is deterministic per
seed and a longer one extends a shorter one.

`extra_object_rate` makes that fraction of a dataset's images also show one object the caption does not mention (a
random shape in another caption colour, clear of the captioned objects), as web images often show more than their
captions say. A model pre-trained on such data adds objects nobody asked for, a flaw the oracle charges (its
stray-colour penalty) and that alignment should remove; unlike a square's corner crispness it is visible at the scale
of whole objects, so a reward model can see it in a noisy latent.

The vocabulary is the single source of truth for the dataset, the oracle (drm_ray/toy/oracle.py) and the toy
tokenizers (drm_ray/toy/model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4
BACKGROUND = (0.0, 0.0, 0.0)
COLOURS = {  # far apart in RGB, so the oracle's nearest-palette-colour test is unambiguous
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.80, 0.15), "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
POSITIONS = {  # name -> (phrase, anchor (x, y) in pixels of the 32x32 image)
    "left": ("on the left", (8.0, 16.0)), "right": ("on the right", (24.0, 16.0)),
    "top": ("at the top", (16.0, 8.0)), "bottom": ("at the bottom", (16.0, 24.0)),
    "center": ("in the center", (16.0, 16.0)),
}
JITTER = 2.0           # pixels around the anchor
SIZE_RANGE = (4.0, 6.0)  # half-extent of a single shape, pixels
PAIR_SIZE_RANGE = (3.0, 4.5)
EXTRA_SIZE_RANGE = (3.0, 4.0)  # half-extent of an uncaptioned extra object (`extra_object_rate`)


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    position: str | None  # None for a count of two
    count: int

    @property
    def text(self) -> str:
        if self.count == 2:
            return f"two {self.colour} {PLURAL[self.shape]}"
        return f"a {self.colour} {self.shape} {POSITIONS[self.position][0]}"


def all_captions() -> list[Caption]:
    """The 90 captions in a fixed order."""
    out = [Caption(c, s, p, 1) for c in COLOURS for s in SHAPES for p in POSITIONS]
    return out + [Caption(c, s, None, 2) for c in COLOURS for s in SHAPES]


def caption_texts() -> list[str]:
    return [c.text for c in all_captions()]


def parse_caption(text: str) -> Caption:
    """The inverse of `Caption.text`; a ValueError names a caption outside the toy vocabulary."""
    for cap in all_captions():
        if cap.text == text.strip():
            return cap
    raise ValueError(f"{text!r} is not a toy-world caption (see drm_ray.toy.world.all_captions)")


def vocabulary() -> list[str]:
    """Every word of every caption."""
    words = sorted({w for t in caption_texts() for w in t.split()})
    return words


# ---------------------------------------------------------------------------------------------- drawing

_GRID = (np.arange(RESOLUTION * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # supersampled pixel centres, in pixels


def shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Anti-aliased coverage [32, 32] in [0, 1] of a shape centred at (cx, cy) with half-extent `half`."""
    x, y = np.meshgrid(_GRID, _GRID)  # [4H, 4W]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= half * 0.9) & (np.abs(dy) <= half * 0.9)  # same area scale as the circle
    elif shape == "triangle":  # pointing up: apex at the top, base at the bottom
        t = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base row
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    s = SUPERSAMPLE
    return inside.reshape(RESOLUTION, s, RESOLUTION, s).mean(axis=(1, 3))


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    canvas *= 1 - mask[..., None]
    canvas += mask[..., None] * np.asarray(colour, dtype=np.float64)


def render_scene(cap: Caption, rng: np.random.Generator) -> np.ndarray:
    """A float image [32, 32, 3] in [0, 1] that shows `cap`, with random size, jitter and colour jitter."""
    return _draw(cap, rng)[0]


def _draw(cap: Caption, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """(the image of `cap`, its objects as (cx, cy, half-extent))."""
    canvas = np.zeros((RESOLUTION, RESOLUTION, 3)) + np.asarray(BACKGROUND)
    colour = np.clip(np.asarray(COLOURS[cap.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    if cap.count == 1:
        ax, ay = POSITIONS[cap.position][1]
        cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
        half = rng.uniform(*SIZE_RANGE)
        _paint(canvas, shape_mask(cap.shape, cx, cy, half), colour)
        return canvas, [(cx, cy, half)]
    halves = rng.uniform(*PAIR_SIZE_RANGE, size=2)
    for _ in range(100):  # two shapes apart from each other, inside the frame
        centres = rng.uniform(6, RESOLUTION - 6, size=(2, 2))
        if np.linalg.norm(centres[0] - centres[1]) > halves.sum() + 4:
            break
    for (cx, cy), half in zip(centres, halves):
        _paint(canvas, shape_mask(cap.shape, cx, cy, half), colour)
    return canvas, [(float(cx), float(cy), float(h)) for (cx, cy), h in zip(centres, halves)]


def add_extra_object(canvas: np.ndarray, cap: Caption, objects: list[tuple[float, float, float]],
                     rng: np.random.Generator) -> np.ndarray:
    """Paint one object the caption does not mention: a random shape in another caption colour, anywhere in the
    frame 3 px clear of `objects` (its own connected component; the first of 200 random positions that is, which in
    a 32 px frame holding at most two objects of half-extent <= 6 always exists in practice). Returns `canvas`,
    changed in place."""
    others = [c for c in COLOURS if c != cap.colour]
    name = others[int(rng.integers(len(others)))]
    colour = np.clip(np.asarray(COLOURS[name]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    half = rng.uniform(*EXTRA_SIZE_RANGE)
    for _ in range(200):
        cx, cy = rng.uniform(half + 1, RESOLUTION - half - 1, size=2)
        if all(np.hypot(cx - ox, cy - oy) > half + oh + 3 for ox, oy, oh in objects):
            break
    _paint(canvas, shape_mask(shape, cx, cy, half), colour)
    return canvas


def scene(seed: int, index: int, extra_object_rate: float = 0.0) -> tuple[Caption, np.ndarray]:
    """Scene `index` of dataset `seed`: a uniformly drawn caption and an image of it. With `extra_object_rate` > 0
    that fraction of the images also shows one object its caption does not mention (`add_extra_object`), like web
    images whose captions leave things out; the captioned content is the same scene as at rate 0."""
    if not 0.0 <= extra_object_rate <= 1.0:
        raise ValueError(f"extra_object_rate must be in [0, 1], got {extra_object_rate}")
    rng = np.random.default_rng([seed, index])
    caps = all_captions()
    cap = caps[int(rng.integers(len(caps)))]
    canvas, objects = _draw(cap, rng)
    if extra_object_rate > 0 and rng.random() < extra_object_rate:
        add_extra_object(canvas, cap, objects, rng)
    return cap, canvas


def scene_batch(seed: int, start: int, count: int,
                extra_object_rate: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Scenes start..start+count-1 as (caption texts, images [N, 32, 32, 3] float32 in [0, 1])."""
    caps, images = zip(*(scene(seed, i, extra_object_rate) for i in range(start, start + count)))
    return [c.text for c in caps], np.stack(images).astype(np.float32)
