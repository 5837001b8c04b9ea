"""The toy world's hidden oracle: how well an image shows its caption, computed from pixels alone.

    score = 0.75 * faithfulness + 0.25 * cleanliness                      in [0, 1]
    faithfulness = colour * (0.4 + 0.3 * shape + 0.3 * placement)

- colour: the caption's colour is present: pixels whose nearest palette colour (background included) is the named
  one, within 0.35 in RGB, saturating at 20 pixels. Everything else is gated by it: a perfect circle in the wrong
  colour is not "a red circle".
- shape: the probability of the named shape under a Gaussian classifier of the largest object's (fill ratio of its
  bounding box, bottom-vs-top width asymmetry); each shape's feature mean and spread are measured on rendered scenes.
  For "two ..." captions, the mean over the two largest objects.
- placement: one object: 1 within 2 px of the named anchor, falling linearly to 0 at 8 px (the anchor spacing).
  Two objects: 1 when exactly two objects of that colour are present, 0.5 when one or three, else 0.
- cleanliness: the fraction of pixels within 0.2 of some palette colour (blur and noise lower it), times a penalty
  for pixels in other caption colours (stray objects), saturating at 20 such pixels: an extra object the caption does
  not mention (drm_ray.toy.world's `extra_object_rate`; `has_extra_object` detects one) costs the whole term.

`correct` is the binary version: the colour present, the shape classified right, and the object within 5 px of its
anchor (placement >= 0.5) or exactly two objects. The shape prototypes are measured on crisp renders, so the shape
criterion also grades crispness: blur rounds a square's corners and lowers its fill ratio toward a circle's (the
pre-trained toy policy's squares average 0.84 against 0.80 for a rendered circle and 1.00 for a rendered square), and
a square a person would still call a square is graded as a circle (88% of that policy's squares;
`bench/policy_breakdown.py` measures it). Nothing here looks at a generator's
internals; the same function grades the dataset, samples of the pre-trained model, RL evaluation panels and
Step-wise Sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drm_ray.toy.world import BACKGROUND, COLOURS, POSITIONS, SHAPES, Caption, parse_caption, render_scene

PALETTE = np.array([BACKGROUND, *COLOURS.values()])  # [1 + 5, 3]; index 0 is the background
COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}
MATCH = 0.35        # RGB distance for "this pixel shows that colour"
CRISP = 0.20        # RGB distance for "this pixel is a clean palette colour"
MIN_OBJECT = 4      # pixels; smaller blobs are noise, not objects
SATURATE = 20.0     # pixels
STD_FLOOR = 0.03    # of the shape classifier's feature spread, so it is never overconfident


@dataclass
class OracleResult:
    score: np.ndarray        # [N] in [0, 1]
    correct: np.ndarray      # [N] bool
    colour: np.ndarray       # [N] components, each in [0, 1]
    shape: np.ndarray
    placement: np.ndarray
    cleanliness: np.ndarray


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean [H, W] mask: (labels [H, W] with 0 = background, count)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate the minimum label to 4-neighbours until nothing changes
        padded = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                                padded[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, labels):
            break
        labels = nb
    ids = np.unique(labels[mask])
    out = np.zeros((h, w), dtype=np.int64)
    for n, i in enumerate(ids, start=1):
        out[labels == i] = n
    return out, len(ids)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """(fill ratio of the bounding box, (bottom-half mean width - top-half mean width) / box width) of one object."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    widths = box.sum(axis=1)
    half = (y1 - y0) / 2
    top = widths[: int(np.floor(half))].mean() if half >= 1 else widths.mean()
    bottom = widths[int(np.ceil(half)):].mean() if half >= 1 else widths.mean()
    return np.array([box.mean(), (bottom - top) / (x1 - x0)])


def target_mask(image: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels showing `colour`, pixels showing another caption colour, distance to the nearest palette colour)."""
    dist = np.linalg.norm(image[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, 6]
    nearest, d_min = dist.argmin(axis=-1), dist.min(axis=-1)
    target = (nearest == COLOUR_INDEX[colour]) & (d_min < MATCH)
    stray = (nearest != COLOUR_INDEX[colour]) & (nearest != 0) & (d_min < MATCH)
    return target, stray, d_min


def _shape_model() -> tuple[np.ndarray, np.ndarray]:
    """Per-shape feature mean and std [3, 2], measured on 300 rendered one-object scenes (fixed seed)."""
    rng = np.random.default_rng(12345)
    feats: dict[str, list] = {s: [] for s in SHAPES}
    for i in range(300):
        cap = Caption(list(COLOURS)[i % len(COLOURS)], SHAPES[i % 3], list(POSITIONS)[(i // 3) % 5], 1)
        target, _, _ = target_mask(render_scene(cap, rng), cap.colour)
        feats[cap.shape].append(shape_features(target))
    mean = np.stack([np.mean(feats[s], axis=0) for s in SHAPES])
    std = np.stack([np.std(feats[s], axis=0) for s in SHAPES])
    return mean, np.maximum(std, STD_FLOOR)


PROTOTYPE_MEAN, PROTOTYPE_STD = _shape_model()


def shape_probabilities(mask: np.ndarray) -> np.ndarray:
    """Soft nearest-prototype classification of one object over SHAPES: [3] summing to 1."""
    z = (shape_features(mask) - PROTOTYPE_MEAN) / PROTOTYPE_STD  # [3, 2]
    logits = -0.5 * (z ** 2).sum(axis=1) - np.log(PROTOTYPE_STD).sum(axis=1)  # diagonal Gaussian per shape
    p = np.exp(logits - logits.max())
    return p / p.sum()


def score_one(image: np.ndarray, cap: Caption) -> tuple[float, bool, float, float, float, float]:
    """One image [H, W, 3] in [0, 1] against a parsed caption: (score, correct, colour, shape, placement, clean)."""
    target, stray, d_min = target_mask(image, cap.colour)
    cleanliness = float((d_min < CRISP).mean()) * (1.0 - min(1.0, stray.sum() / SATURATE))
    colour = min(1.0, target.sum() / SATURATE)

    labels, n = label_components(target)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    objects = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= MIN_OBJECT]
    shape = placement = 0.0
    shape_ok = False
    if objects:
        want = SHAPES.index(cap.shape)
        probs = [shape_probabilities(labels == i) for i in objects[:cap.count]]
        shape = float(np.mean([p[want] for p in probs]))
        shape_ok = all(int(p.argmax()) == want for p in probs)
        if cap.count == 1:
            ys, xs = np.nonzero(labels == objects[0])
            ax, ay = POSITIONS[cap.position][1]
            d = float(np.hypot(xs.mean() + 0.5 - ax, ys.mean() + 0.5 - ay))
            placement = float(np.clip(1.0 - (d - 2.0) / 6.0, 0.0, 1.0))
        else:
            placement = {2: 1.0, 1: 0.5, 3: 0.5}.get(len(objects), 0.0)
    faithfulness = colour * (0.4 + 0.3 * shape + 0.3 * placement)
    score = 0.75 * faithfulness + 0.25 * cleanliness
    correct = colour >= 1.0 and shape_ok and placement >= (0.5 if cap.count == 1 else 1.0)
    return score, correct, colour, shape, placement, cleanliness


def has_extra_object(images, captions: list[str]) -> np.ndarray:
    """[N] bool: the image shows an object (>= MIN_OBJECT connected pixels) in a caption colour other than its
    caption's, one the caption does not mention (drm_ray.toy.world.add_extra_object draws such objects; the score
    charges them through cleanliness's stray-pixel penalty)."""
    arr = _channels_last(images)
    out = []
    for image, text in zip(arr, captions):
        _, stray, _ = target_mask(image.astype(np.float64), parse_caption(text).colour)
        labels, n = label_components(stray)
        out.append(n > 0 and int(np.bincount(labels.ravel())[1:].max()) >= MIN_OBJECT)
    return np.asarray(out, dtype=bool)


def _channels_last(images) -> np.ndarray:
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[-1]):
        raise ValueError(f"expected images [N, 3, H, W] or [N, H, W, 3], got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    return arr


def score_terms(result: OracleResult) -> dict[str, np.ndarray]:
    """The score's four additive terms (they sum to `result.score`): which criterion a score difference comes from."""
    return {"colour": 0.75 * 0.4 * result.colour, "shape": 0.75 * 0.3 * result.colour * result.shape,
            "placement": 0.75 * 0.3 * result.colour * result.placement, "cleanliness": 0.25 * result.cleanliness}


def oracle_scores(images, captions: list[str]) -> OracleResult:
    """Grade images (a [N, 3, H, W] tensor / array in [0, 1], or [N, H, W, 3]) against their caption texts."""
    arr = _channels_last(images)
    if len(arr) != len(captions):
        raise ValueError(f"{len(arr)} images but {len(captions)} captions")
    rows = [score_one(a.astype(np.float64), parse_caption(c)) for a, c in zip(arr, captions)]
    cols = list(zip(*rows)) if rows else [[]] * 6
    return OracleResult(*(np.asarray(c, dtype=bool if i == 1 else np.float64) for i, c in enumerate(cols)))
