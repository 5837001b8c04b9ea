import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drm_dir(tmp_path_factory):
    from drm_ray.reward.model import build_drm
    from drm_ray.models.sd3 import build_tiny

    path = tmp_path_factory.mktemp("drm") / "drm"
    build_drm(build_tiny(seed=7, text=False, vae=False).transformer, latent_size=8, seed=7).save_pretrained(path)
    return path


def run_job(*args):
    return subprocess.run([sys.executable, "jobs/sample.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ})


@pytest.mark.slow
def test_sample_job_writes_the_images_it_promises(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na green square\na blue triangle\n")
    out = tmp_path / "out"
    proc = run_job("--prompts", prompts, "--out", out, "--batch-size", 2, "sampling.noise_level=0.7",
                   "sampling.num_steps=3", f"run.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert [m["prompt"] for m in meta] == ["a red circle", "a green square", "a blue triangle"]
    assert [m["seed"] for m in meta] == [42, 43, 44] and all(m["num_steps"] == 3 for m in meta)
    assert all(m["k"] == 1 and m["step_scores"] is None and m["final_score"] is None for m in meta)
    for m in meta:
        with Image.open(out / m["file"]) as im:
            assert im.size == (64, 64)


@pytest.mark.slow
def test_stepwise_sample_job_with_a_drm(tmp_path, drm_dir, tiny_clip_dir):
    """--k 2 with a DRM and 2 seeds per prompt, judged by CLIP: PNGs, the Parquet table, an MLflow run with
    diversity and the judge."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green square\n")
    run = tmp_path / "run"
    proc = run_job("--prompts", prompts, "--k", 2, "--drm", drm_dir, "--seeds-per-prompt", 2, "--batch-size", 3,
                   "sampling.num_steps=3", f"run.output_dir={run}", "reward.judges=[clip]",
                   f"reward.clip_path={tiny_clip_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = pq.read_table(run / "samples" / "metadata.parquet").to_pylist()
    # Prompt-major; seed = 42 + replica * 2 prompts + prompt index.
    assert [(m["prompt"], m["seed"], m["diversity_group"]) for m in meta] == [
        ("a red circle", 42, 0), ("a red circle", 44, 0), ("a green square", 43, 1), ("a green square", 45, 1)]
    for m in meta:
        assert m["k"] == 2 and len(m["step_scores"]) == 2 and len(m["score_spread"]) == 2
        assert all(np.isfinite(m["step_scores"])) and np.isfinite(m["final_score"])
        assert (run / "samples" / m["file"]).is_file()
    assert (run / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("drm-ray").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["sample.k"] == "2"
    assert {"diversity/pairwise_rms", "diversity/one_minus_ssim", "sample/final_score_mean",
            "sample/selected_score", "sample/judge/clip", "sample/step_final_spearman",
            "sample/step_judge_spearman/clip"} <= set(mlrun.data.metrics)
    # the judge's column is the stock CLIP's logit of each written PNG and its prompt
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    for m in meta:
        inputs = processor(text=[m["prompt"]], images=[np.asarray(Image.open(run / "samples" / m["file"]))],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            logit = float(model(**inputs).logits_per_image[0, 0])
        assert m["judge_clip"] == pytest.approx(logit, abs=1e-3)
    assert mlrun.data.metrics["sample/judge/clip"] == pytest.approx(np.mean([m["judge_clip"] for m in meta]))
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["samples_grid.png"]


@pytest.mark.slow
def test_sample_job_ray_mode_matches_local_mode(ray_session, tmp_path, drm_dir):
    """The job's --ray path (in-process, so it joins the session's Ray) gives the local mode's images."""
    spec = importlib.util.spec_from_file_location("sample_job", ROOT / "jobs" / "sample.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    common = ["--k", "2", "--drm", str(drm_dir), "--batch-size", "2", "sampling.num_steps=3",
              "tracking.experiment=ray-test"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green square\na blue triangle\n")
    local = job.main([*common, "--prompts", str(prompts), f"run.output_dir={tmp_path / 'local'}"])
    remote = job.main([*common, "--prompts", str(prompts), "--ray", "--workers", "1",
                       f"run.output_dir={tmp_path / 'ray'}"])
    files = sorted(p.name for p in local.glob("*.png"))
    assert len(files) == 3 and files == sorted(p.name for p in remote.glob("*.png"))
    for name in files:
        assert np.array_equal(np.asarray(Image.open(local / name)), np.asarray(Image.open(remote / name)))
    assert pq.read_table(local / "metadata.parquet").equals(pq.read_table(remote / "metadata.parquet"))


@pytest.mark.slow
def test_sample_job_rejects_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    proc = run_job("--prompts", empty, f"run.output_dir={tmp_path}")
    assert proc.returncode != 0 and "holds no prompts" in proc.stderr
    proc = run_job("sampling.k=0")
    assert proc.returncode != 0 and "sampling.k" in proc.stderr
    proc = run_job("--k", 3)
    assert proc.returncode != 0 and "--k 3 needs --drm" in proc.stderr
