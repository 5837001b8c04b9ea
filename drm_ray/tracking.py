"""MLflow tracking, used by drivers only (workers send metrics to their driver).

Defaults to a sqlite store `mlflow.db` in the run's output directory with artifacts beside it, so a plain local run
needs no server; `tracking_uri` (config or the MLFLOW_TRACKING_URI environment variable) points at any server. The
client API with an explicit run id is used instead of MLflow's global "active run", so a resumed job keeps logging
into the same run.
"""

from __future__ import annotations

import logging
import os
import re
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


class Tracker:
    """One MLflow run: params, metrics, images and artifacts."""

    def __init__(self, tracking_uri: str | None, experiment: str, output_dir: str | Path,
                 run_name: str | None = None, run_id: str | None = None, tags: dict[str, str] | None = None):
        self.uri = resolve_tracking_uri(tracking_uri, output_dir)
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
