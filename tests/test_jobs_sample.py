import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sample_job_writes_the_images_it_promises(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na green square\na blue triangle\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/sample.py", "--prompts", str(prompts), "--out", str(out),
                           "--batch-size", "2", "sampling.noise_level=0.7", "sampling.num_steps=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert [m["prompt"] for m in meta] == ["a red circle", "a green square", "a blue triangle"]
    assert [m["seed"] for m in meta] == [42, 43, 44] and all(m["num_steps"] == 3 for m in meta)
    for m in meta:
        with Image.open(out / m["file"]) as im:
            assert im.size == (64, 64)


@pytest.mark.slow
def test_sample_job_rejects_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    proc = subprocess.run([sys.executable, "jobs/sample.py", "--prompts", str(empty)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds no prompts" in proc.stderr
    proc = subprocess.run([sys.executable, "jobs/sample.py", "sampling.k=0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "sampling.k" in proc.stderr
