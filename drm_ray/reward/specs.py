"""Reward specs as the config writes them: "kind" or "kind=weight" (no torch import: config validation uses this)."""

from __future__ import annotations

import math
from dataclasses import dataclass

IMAGE_KINDS = ("oracle", "clip", "callable")


def reward_kinds() -> tuple[str, ...]:
    return ("drm", *IMAGE_KINDS)


@dataclass(frozen=True)
class RewardSpec:
    kind: str              # drm | oracle | clip | callable
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.kind


def parse_spec(text: str) -> RewardSpec:
    """`kind` or `kind=weight` (`drm`, `oracle=0.5`); the kind's model comes from its own config field
    (reward.drm_path, reward.clip_path, reward.callable)."""
    kind, sep, weight = str(text).partition("=")
    kind = kind.strip()
    if kind not in reward_kinds():
        raise ValueError(f"unknown reward kind {kind!r} in {text!r}; known: {', '.join(reward_kinds())}")
    try:
        w = float(weight) if sep else 1.0
    except ValueError:
        raise ValueError(f"reward {text!r}: the weight after '=' must be a number") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"reward {text!r}: the weight must be a finite number > 0")
    return RewardSpec(kind, w)
