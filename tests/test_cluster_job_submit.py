"""`ray job submit` end to end, the way README's "Run on a cluster" submits: a `ray start --head --block` child
process (loopback dashboard, free ports, its own temp dir, RAY_AUTH_MODE=disabled on both sides), the working
directory shipped with --runtime-env-json, the tiny job run for 2 iterations of the GRPO baseline (`--algo grpo`; the
in-process tests run Step-GRPO), its outputs and MLflow run checked; then only that head is stopped (SIGTERM to `ray start --block`) and its processes are confirmed gone. Never `ray stop`: that would stop
every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from drm_ray.reward.model import build_drm
from drm_ray.models.sd3 import build_tiny

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the dashboard at {url} did not answer within {timeout_s}s")


def _descendants(head: subprocess.Popen) -> list[psutil.Process]:
    """Every process under `ray start` (by parentage, so a child that left the process group still counts)."""
    return psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait for a PID 1 that never reaps it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_head(head: subprocess.Popen, tree: list[psutil.Process]) -> list[str]:
    """Stop only this head: SIGTERM `ray start --block`, which stops what it started, in order. A detached actor
    that the job leaves behind (Ray Train's _AutoscalingCoordinatorActor) holds the raylet's shutdown for 30 s, so
    after a grace period the head's remaining processes get SIGTERM by PID. Returns what survived all that."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            for p in tree:
                if _running(p):
                    p.terminate()
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (alive := [p for p in tree if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:  # never leave them behind, but report them
        p.kill()
    return survivors


def _check_grpo_run(out: Path, summary: dict) -> None:
    """The GRPO baseline: final images only, every trajectory's steps trained, everything in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics  # the last value of each
    assert run.data.params["grpo.algo"] == "grpo"
    assert metrics["train/rollout_logp_dev"] < 1e-4 and "reward/step0_mean" not in metrics
    assert metrics["train/states"] == 4 * 4 * 3  # B prompts x k images x 3 trained steps, one child each
    # GRPO scores final images only: 2 iterations x 4 prompts x k=4 images; 4 steps each
    assert summary["compute"] == {"policy_forwards": 2 * 16 * 4, "drm_forwards": 2 * 16}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/drm_score")] == [0, 2]
    panels = [a.path for a in client.list_artifacts(run.info.run_id, "panel")]
    assert panels == ["panel/iter_000000.png", "panel/iter_000002.png"]
    for key in ("timing/rollout", "timing/score", "timing/learn", "timing/sync", "train/clip_frac",
                "train/approx_kl", "train/kl_ref", "lora/norm", "rollout/candidates_per_s", "adv/zero_std_frac"):
        assert key in metrics, key


@pytest.mark.slow
def test_ray_job_submit_runs_grpo_on_a_started_head(tmp_path):
    drm = tmp_path / "drm"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8).save_pretrained(drm)
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="drmj", dir="/tmp")  # short: Ray's socket paths live under it (107-byte cap)
    gcs, dashboard, agent, client = _free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{dashboard}"
    timings = {}
    start = time.monotonic()
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--num-cpus=2",
             f"--temp-dir={ray_tmp}/ray", "--disable-usage-stats", "--block"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        _wait_for_dashboard(url, head)
        timings["head_up"] = time.monotonic() - start
        runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "outputs", "mlruns", "*.db"]}
        start = time.monotonic()
        job = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "jobs/step_grpo.py", "--algo", "grpo", f"reward.drm_path={drm}", "grpo.iterations=2",
             "grpo.eval_every=2", "grpo.checkpoint_every=2", f"run.output_dir={out}"],
            env=env, capture_output=True, text=True, timeout=480)
        timings["job"] = time.monotonic() - start
        tree = _descendants(head)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout and "iter 2/2" in job.stdout, job.stdout[-4000:]
        # a quiet console: no C++ error lines from Ray's core worker (e.g. its warning about restartable actors whose
        # constructors take object-store arguments) and no Python tracebacks
        assert "core_worker.cc" not in job.stdout + job.stderr and "Traceback" not in job.stdout, job.stdout[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["iteration"] == 2
        # the last progress line shows the panel of its own iteration (2), not the one before
        line = [ln for ln in job.stdout.splitlines() if "iter 2/2" in ln][-1]
        assert f"eval {summary['eval'][-1]['eval/reward']:+.4f}" in line, (line, summary["eval"])
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (out / "checkpoints" / "iter-000002" / "state.json").is_file()
        _check_grpo_run(out, summary)
    finally:
        tree = tree or _descendants(head)
        start = time.monotonic()
        survivors = _stop_head(head, tree)
        timings["stop"] = time.monotonic() - start
        print("ray job submit timings (s):", {k: round(v, 1) for k, v in timings.items()})
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert head.returncode is not None
    assert len(tree) > 3, "expected the head's Ray processes (gcs_server, raylet, dashboard, ...) under ray start"
    assert survivors == [], f"processes of the stopped head still running: {survivors}"
