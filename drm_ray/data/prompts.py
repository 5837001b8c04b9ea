"""Prompt sets: a text file (one prompt per line), a Parquet file with a `prompt` column, or a preset's built-in set."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")

# The built-in set of the default (tiny) run: short captions in the vocabulary of the synthetic preference data.
BUILTIN_PROMPTS = tuple(f"a {c} {s}" for s in SHAPES for c in COLOURS)


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or unreadable; the message names the file."""


def builtin_prompts(preset: str = "tiny") -> list[str]:
    """The built-in prompt set of a preset: the toy world's 90 captions for `toy`, else the tiny set."""
    if preset == "toy":
        from drm_ray.toy.world import caption_texts
        return caption_texts()
    return list(BUILTIN_PROMPTS)


def load_prompts(path: str | Path | None, preset: str = "tiny") -> list[str]:
    """Prompts from `path` (.txt or .parquet), or the preset's built-in set when `path` is None."""
    if path is None:
        return builtin_prompts(preset)
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path, columns=["prompt"])
        except KeyError as err:
            raise PromptFileError(f"prompt file {path} has no 'prompt' column") from err
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise PromptFileError(f"prompt file {path} is not a readable Parquet file: {err}") from err
        prompts = [p for p in table.column("prompt").to_pylist() if isinstance(p, str) and p.strip()]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(f"prompt file {path} is not UTF-8 text: {err}") from err
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts


class PromptSampler:
    """Draws B prompt groups per iteration: an epoch-wise shuffled order (seeded), one seed per group.

    Its whole state is (seed, epoch, cursor, groups drawn), so a checkpoint restores the exact position.
    """

    def __init__(self, num_prompts: int, seed: int, epoch: int = 0, cursor: int = 0, drawn: int = 0):
        if num_prompts < 1:
            raise ValueError("the prompt set is empty")
        self.num_prompts, self.seed, self.epoch, self.cursor, self.drawn = num_prompts, seed, epoch, cursor, drawn

    def _order(self) -> list[int]:
        import numpy as np

        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts).tolist()

    def next(self, batch: int) -> list[tuple[int, int, int]]:
        """`batch` groups as (group_id, prompt_index, seed); group ids and seeds never repeat within a run."""
        out = []
        order = self._order()
        while len(out) < batch:
            if self.cursor == self.num_prompts:
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            gid = self.drawn
            out.append((gid, order[self.cursor], self.seed * 1_000_003 + gid))
            self.cursor += 1
            self.drawn += 1
        return out

    def state(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "drawn": self.drawn}

    @classmethod
    def from_state(cls, state: dict) -> "PromptSampler":
        return cls(**state)
