"""What a person sees in a terminal: config errors as one line, the resolved config on request, library noise off
by default, one progress bar per job and a short summary.

Every job parses its arguments with `add_config_args` (a preset, dotted overrides, `--print-config`, `--verbose`)
and loads its config with `job_config`, which turns a `ConfigError` into `error: <message>` on stderr and exit
status 2, as argparse does for its own arguments, and prints every field of the resolved config with its value and
its one-line meaning (the comment beside the field in drm_ray/config.py) when asked.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import sys
import time

from drm_ray.config import Config, ConfigError, load_config

# Loggers whose INFO chatter is noise to a person running a job (kept with --verbose).
NOISY_LOGGERS = ("mlflow", "ray", "ray.train", "ray.data", "deepspeed", "DeepSpeed", "torch.distributed",
                 "transformers", "diffusers", "urllib3", "alembic", "filelock")


def add_config_args(parser) -> None:
    """The arguments every job takes: a preset, dotted overrides, --print-config and --verbose."""
    parser.add_argument("--config", default="tiny", help="preset name (tiny, toy, small, sd35m) or path to a YAML "
                                                         "file")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. sampling.k=4 grpo.iterations=10")
    parser.add_argument("--print-config", action="store_true",
                        help="print every field of the resolved config (preset + overrides) with its value and "
                             "meaning, then exit")
    parser.add_argument("--verbose", action="store_true",
                        help="keep Ray's worker logs and library INFO / warnings on the console")


def fail(message) -> None:
    """One `error: ...` line on stderr and exit status 2 (argparse's convention for bad input); a message listing
    several problems on several lines is joined with "; "."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = parts[0] + (" " + "; ".join(parts[1:]) if len(parts) > 1 else "") if parts else "unknown error"
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def job_config(args, overrides=None, job: str | None = None) -> Config:
    """The job's validated config from `args` (see `add_config_args`); exits with one line on a config error, or
    after printing the resolved config with --print-config. Also quiets library noise unless --verbose."""
    try:
        cfg = load_config(args.config, list(args.overrides if overrides is None else overrides), job=job)
    except ConfigError as err:
        fail(err)
    if getattr(args, "print_config", False):
        print(describe_config(cfg))
        raise SystemExit(0)
    quiet_libraries(getattr(args, "verbose", False))
    return cfg


# Errors in what the user gave (config, files, weights, cluster): `run_job` prints them as one line.
INPUT_ERRORS = (("drm_ray.config", "ConfigError"), ("drm_ray.data.prompts", "PromptFileError"),
                ("drm_ray.data.preferences", "PreferenceDataError"), ("drm_ray.data.cache", "CacheError"),
                ("drm_ray.models.sd3", "ModelSourceError"), ("drm_ray.toy.model", "ToyCheckpointError"),
                ("drm_ray.placement", "ClusterResourcesError"))


def run_job(main, *args, **kwargs):
    """Run a job's `main`; an input error (see INPUT_ERRORS), raised here or inside a Ray actor or task, becomes
    `error: <message>` and exit status 2 instead of a traceback. Anything else is a bug and keeps its traceback."""
    try:
        return main(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is the user's input
        cause = getattr(err, "cause", None) or err  # a RayTaskError carries the remote exception as .cause
        # an error class can only have been raised if its module was imported: no heavy import here
        known = tuple(getattr(sys.modules[m], n) for m, n in INPUT_ERRORS if m in sys.modules)
        if isinstance(cause, known):
            fail(cause)
        raise


# ---------------------------------------------------------------------------------------------- the resolved config


def field_notes() -> dict[str, str]:
    """`section.field -> one-line meaning`, read from the comments beside the fields in drm_ray/config.py (a comment
    continued on the following comment-only lines is joined)."""
    notes = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory().__class__
        lines, _ = inspect.getsourcelines(cls)
        current = None
        for line in lines:
            m = re.match(r"    (\w+): [^#]*?(?:#\s?(.*))?$", line)
            if m:
                current = f"{section.name}.{m.group(1)}"
                notes[current] = (m.group(2) or "").strip()
                continue
            c = re.match(r"\s+#\s?(.*)$", line)
            if c and current and notes.get(current):
                notes[current] += " " + c.group(1).strip()
            else:
                current = None
    return notes


def describe_config(cfg: Config) -> str:
    """Every field as `section.field = value  # meaning`, by section, aligned."""
    notes = field_notes()
    flat = cfg.flat()
    width = max(len(f"{k} = {_show(v)}") for k, v in flat.items())
    width = min(width, 60)
    out, last = [], None
    for key, value in flat.items():
        section = key.split(".")[0]
        if section != last:
            out.append(("" if last is None else "\n") + f"[{section}]")
            last = section
        text = f"{key} = {_show(value)}"
        note = notes.get(key, "")
        out.append(f"{text:<{width}}  # {note}" if note else text)
    return "\n".join(out)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


# ---------------------------------------------------------------------------------------------- noise


def quiet_libraries(verbose: bool) -> None:
    """Unless `verbose`: library INFO logs off, transformers' warnings off, and (read by `init_ray`) Ray's worker
    logs kept out of the driver's console; they stay in Ray's session logs (/tmp/ray/session_latest/logs)."""
    if verbose:
        os.environ["DRM_RAY_VERBOSE"] = "1"
        return
    os.environ.setdefault("DRM_RAY_VERBOSE", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "requires torchvision ... falling back"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level when imported
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Token authentication is enabled for this Ray cluster": the local cluster's secure default, said on every start
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)


def verbose() -> bool:
    return os.environ.get("DRM_RAY_VERBOSE", "1") == "1"


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """One progress bar (tqdm) on a terminal; elsewhere (`ray job logs`, CI, files) plain lines: one per update, or
    at most about `lines` of them (every total / lines steps, and the last)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", stream=None, unit: str = "iter",
                 lines: int | None = None, start: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stdout
        self.start = time.perf_counter() if start is None else start  # when step `initial` was done (perf_counter)
        self.initial = initial
        self.every = max(1, total // lines) if lines else 1
        self.next_line = initial + self.every
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True,
                            unit=unit, leave=True)

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step < self.next_line and step < self.total:
            return
        self.next_line = step + self.every
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.initial, 1) * (self.total - step)
        print(f"[{self.desc}] {self.unit} {step}/{self.total} {text} | {_duration(elapsed)} elapsed, eta "
              f"{_duration(eta)}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A message that must not be overwritten by the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
