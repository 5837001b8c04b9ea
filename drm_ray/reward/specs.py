"""Reward specs as the config writes them: "kind", "kind=weight", "kind@source" or "kind@source=weight" (no torch
import: config validation uses this)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

IMAGE_KINDS = ("oracle", "clip", "callable")
SOURCE_FIELDS = {"drm": "reward.drm_path", "clip": "reward.clip_path", "callable": "reward.callable"}


def reward_kinds() -> tuple[str, ...]:
    return ("drm", *IMAGE_KINDS)


@dataclass(frozen=True)
class RewardSpec:
    kind: str                  # drm | oracle | clip | callable
    weight: float = 1.0
    source: str | None = None  # this reward's own model (a DRM or CLIP directory, a callable target); None: the
                               # kind's config field (reward.drm_path, reward.clip_path, reward.callable)

    @property
    def name(self) -> str:
        """What metrics and columns call it: the kind, or `kind-<last part of the source>` for a spec that names its
        own model (clip@/models/PickScore_v1 -> clip-PickScore_v1, callable@my.rewards:hpsv3 -> callable-hpsv3)."""
        if self.source is None:
            return self.kind
        tail = re.split(r"[/:]", self.source.rstrip("/"))[-1]
        return f"{self.kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tail)}"


def parse_spec(text: str) -> RewardSpec:
    """`kind[@source][=weight]`: `drm`, `oracle=0.5`, `clip@/models/PickScore_v1=0.3`, `callable@my.rewards:hpsv3`.
    Without a source the kind's model comes from its config field (reward.drm_path, reward.clip_path,
    reward.callable); a source lets one run use two models of one kind (PickScore and CLIP score)."""
    text = str(text).strip()
    body, weight = (text.rsplit("=", 1) + [None])[:2] if "=" in text else (text, None)
    kind, at, source = body.partition("@")
    kind, source = kind.strip(), source.strip()
    if kind not in reward_kinds():
        raise ValueError(f"unknown reward kind {kind!r} in {text!r}; known: {', '.join(reward_kinds())}")
    if at and (not source or kind not in SOURCE_FIELDS):
        raise ValueError(f"reward {text!r}: " + (f"the {kind} reward takes no '@source'" if kind not in SOURCE_FIELDS
                                                  else "nothing after '@' (expected its model: a directory or "
                                                  "'package.module:function')"))
    try:
        w = float(weight) if weight is not None else 1.0
    except ValueError:
        raise ValueError(f"reward {text!r}: the weight after '=' must be a number") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"reward {text!r}: the weight must be a finite number > 0")
    return RewardSpec(kind, w, source or None)
