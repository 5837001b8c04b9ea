"""sd35m weights come from a local directory or the hub; what cannot provide them fails on the driver, at once, with
one message naming model.path (and HF_TOKEN where a token would help)."""

import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import errors

from drm_ray.models.sd3 import SD3_SUBFOLDERS, ModelSourceError, check_model_source

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_dir(root: Path, skip=()) -> Path:
    for sub in SD3_SUBFOLDERS:
        if sub not in skip:
            (root / sub).mkdir(parents=True)
    return root


def test_local_directory_needs_every_subfolder(tmp_path):
    assert check_model_source(str(_pipeline_dir(tmp_path / "ok"))) == "local"
    bad = _pipeline_dir(tmp_path / "bad", skip=("text_encoder_3", "tokenizer_3"))
    with pytest.raises(ModelSourceError, match=r"bad is a directory but lacks text_encoder_3/, tokenizer_3/ "):
        check_model_source(str(bad))


def test_missing_path_and_empty_path(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_model_source(str(tmp_path / "nowhere" / "sd35"))
    with pytest.raises(ModelSourceError, match="model.path is empty"):
        check_model_source(None)


def test_hub_id_offline_without_a_cached_copy(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set and the local Hugging Face cache has no copy"):
        check_model_source("someone/not-cached-model")


def _http_error(cls, status):
    import httpx2

    return cls("denied", response=httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x")))


@pytest.mark.parametrize("cls, status, message", [
    (errors.GatedRepoError, 403, r"gated model and HF_TOKEN is not set: accept its license"),
    (errors.RepositoryNotFoundError, 404, r"was not found on the hub .*set HF_TOKEN"),
])
def test_hub_id_gated_or_unknown(monkeypatch, cls, status, message):
    # The hub itself cannot be reached from here: the check's call to it answers as the hub would.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def answer(repo_id, **_):
        raise _http_error(cls, status)

    monkeypatch.setattr(huggingface_hub, "auth_check", answer)
    with pytest.raises(ModelSourceError, match=message):
        check_model_source("stabilityai/stable-diffusion-3.5-medium")


@pytest.mark.parametrize("job", ["preprocess.py --pairs x.parquet --out cache", "step_grpo.py", "train_drm.py",
                                 "sample.py"])
def test_sd35m_jobs_fail_fast_without_weights(tmp_path, job):
    """Before any Ray work: one `error:` line naming model.path, exit status 2 (argparse's), within seconds."""
    script, *args = job.split()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--config", "sd35m",
                           f"model.path={tmp_path / 'missing'}", f"run.output_dir={tmp_path / 'out'}", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.path") and "does not exist" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "mlflow.db").exists()
