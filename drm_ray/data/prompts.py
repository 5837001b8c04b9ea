"""Prompt sets: a text file (one prompt per line), a Parquet file with a `prompt` column, or the built-in set."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")

# The built-in set of the default (tiny) run: short captions in the vocabulary of the synthetic preference data.
BUILTIN_PROMPTS = tuple(f"a {c} {s}" for s in SHAPES for c in COLOURS)


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or unreadable; the message names the file."""


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from `path` (.txt or .parquet), or the built-in set when `path` is None."""
    if path is None:
        return list(BUILTIN_PROMPTS)
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
