"""MLflow tracking, used by drivers only (workers send metrics to their driver).

Defaults to a sqlite store `mlflow.db` in the run's output directory with artifacts beside it, so a plain local run
needs no server; `tracking_uri` (config or the MLFLOW_TRACKING_URI environment variable) points at any server. The
client API with an explicit run id is used instead of MLflow's global "active run", so a resumed job keeps logging
into the same run.

A new sqlite store starts as a copy of an empty store that MLflow migrated once per MLflow version (kept under
$XDG_CACHE_HOME/drm_ray): MLflow's own creation runs every schema migration, 2-4 s of every job's start-up on
2 CPU cores, against 0.1 s for the copy.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def redact(value: str) -> str:
    """Hide the password of a URI (`scheme://user:secret@host` -> `scheme://user:***@host`) before it is logged."""
    return re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:***@", value)


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str | Path) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite in the output directory."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "drm_ray"


def _empty_store_template() -> Path:
    """An empty sqlite store made by this MLflow version (made here on first use, by MLflow itself)."""
    import mlflow

    template = _cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".mlflow-", suffix=".db", dir=template.parent)
        os.close(fd)
        os.unlink(tmp)  # MLflow creates (and migrates) the file itself
        try:
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()
            os.replace(tmp, template)  # atomic: a concurrent maker writes the same content
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return template


def prepare_sqlite_store(uri: str) -> bool:
    """Create the sqlite file of `uri` as a copy of the empty-store template when it does not exist yet (any other
    URI, or an existing file, is left alone); returns whether it did. Never overwrites: the copy is linked into
    place only if no other process created the store first. Any failure leaves the creation to MLflow."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return False
    path = Path(uri[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():
        return False
    tmp = None
    try:
        template = _empty_store_template()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        shutil.copyfile(template, tmp)
        with closing(sqlite3.connect(tmp)) as db, db:  # the Default experiment's location, as MLflow would set it
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (os.path.join(os.path.abspath("mlruns"), "0"),))
        os.link(tmp, path)  # fails if the store appeared meanwhile: then that one is used
        return True
    except (OSError, sqlite3.Error) as err:
        log.debug("sqlite store %s: MLflow creates it (%s)", path, err)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class Tracker:
    """One MLflow run: params, metrics, images and artifacts."""

    def __init__(self, tracking_uri: str | None, experiment: str, output_dir: str | Path,
                 run_name: str | None = None, run_id: str | None = None, tags: dict[str, str] | None = None):
        self.uri = resolve_tracking_uri(tracking_uri, output_dir)
        prepare_sqlite_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:"):  # otherwise artifacts land in ./mlruns of the working directory
                artifacts = (Path(output_dir).resolve() / "mlartifacts").as_uri()
            try:
                exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            except Exception:  # another process created it between our look-up and create
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if run_id is None:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow caps a param value at 6000 characters; ours are short, long lists are truncated visibly.
        for key, value in params.items():
            text = redact(str(value))
            self.client.log_param(self.run_id, key, text if len(text) < 6000 else text[:5990] + "...")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
