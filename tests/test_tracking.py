"""MLflow tracking: a new sqlite store is a copy of a template that MLflow migrated once, and must be exactly what
MLflow itself would have made; an existing store is never touched."""

import shutil
import sqlite3
from contextlib import closing

import pytest
from mlflow.tracking import MlflowClient

import drm_ray.tracking as tracking
from drm_ray.tracking import Tracker, prepare_sqlite_store


def _clauses(sql):
    """A CREATE statement's clauses, in no order: MLflow's own migrations emit a table's CHECK constraints in an
    order that differs between two creations (seen: the runs table, one CI run in several), which SQLite ignores."""
    return None if sql is None else sorted(line.strip().rstrip(",").strip() for line in sql.split("\n"))


def _dump(path):
    """Schema, migration version and experiments of a sqlite store (run ids and times aside)."""
    with closing(sqlite3.connect(path)) as db:
        schema = {name: (kind, _clauses(sql))
                  for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master")}
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = db.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
                                 "ORDER BY experiment_id").fetchall()
    return schema, version, experiments


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow's Default experiment points at ./mlruns of the working directory
    return tmp_path / "cache" / "drm_ray"


def test_a_new_store_is_the_one_mlflow_makes(tmp_path, cache, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    tracking._empty_store_template()  # made by a process in another working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")  # MLflow's own creation
    reference.create_experiment("e", artifact_location="file:///x")
    assert prepare_sqlite_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert len([p for p in cache.iterdir() if p.suffix == ".db"]) == 1  # the template, made once
    MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}").create_experiment("e", artifact_location="file:///x")
    assert _dump(tmp_path / "b" / "mlflow.db") == _dump(tmp_path / "a" / "mlflow.db")

    # the copy's Default experiment names this working directory's ./mlruns, not the template maker's
    (tmp_path / "c").mkdir()
    tracker = Tracker(None, "drm-ray", tmp_path / "c", run_name="r")
    tracker.log_metrics({"train/loss": 0.5}, 3)
    client = MlflowClient(tracker.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss")] == [(3, 0.5)]
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlruns" / "0")


def test_an_existing_store_and_other_uris_are_left_alone(tmp_path, cache, monkeypatch):
    first = Tracker(None, "drm-ray", tmp_path, run_name="kept")
    uri = first.uri
    assert not prepare_sqlite_store(uri)  # it exists
    assert MlflowClient(uri).get_run(first.run_id).info.run_name == "kept"
    for other in ("http://127.0.0.1:5000", "sqlite:///:memory:", f"sqlite:///{tmp_path / 'no' / 'dir.db'}"):
        assert not prepare_sqlite_store(other)
    assert not (tmp_path / "no").exists()

    # another process creates the store while this one copies the template: its store wins, untouched
    racing = tmp_path / "race" / "mlflow.db"
    racing.parent.mkdir()
    real_copy = shutil.copyfile

    def copy_then_lose_the_race(src, dst):
        real_copy(src, dst)
        racing.write_bytes(b"the other process's store")
        return dst

    monkeypatch.setattr(tracking.shutil, "copyfile", copy_then_lose_the_race)
    assert not prepare_sqlite_store(f"sqlite:///{racing}")
    assert racing.read_bytes() == b"the other process's store"
    assert [p.name for p in racing.parent.iterdir()] == ["mlflow.db"]  # no temporary file left behind
