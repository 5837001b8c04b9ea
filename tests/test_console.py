"""The console layer: --print-config, one-line input errors, the progress lines off a terminal."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from drm_ray.config import load_config
from drm_ray.console import Progress, describe_config, fail, field_notes, run_job
from drm_ray.data.prompts import PromptFileError

ROOT = Path(__file__).resolve().parents[1]


def test_print_config_lists_every_field_with_its_value_and_a_meaning():
    cfg = load_config("toy", ["sampling.k=6", "grpo.branch_steps=[0,2]"])
    text = describe_config(cfg)
    shown = {}
    for line in text.splitlines():
        if " = " in line:
            key, rest = line.split(" = ", 1)
            shown[key] = rest.split("  # ")[0].rstrip()
    flat = cfg.flat()
    assert set(shown) == set(flat)
    assert shown["sampling.k"] == "6" and shown["grpo.branch_steps"] == "[0, 2]"
    assert shown["model.path"] == "outputs/toy/pretrained" and shown["reward.drm_path"] == "null"
    notes = field_notes()
    assert not [k for k in flat if not notes.get(k)], "every field needs a one-line meaning in config.py"
    # a comment continued on the next line is joined
    assert notes["model.preset"].endswith("sd35m: pre-trained weights from `path`")


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        fail("invalid configuration:\n  sampling.k = 1: must be >= 2\n  grpo.beta = -1.0: must be >= 0")
    assert info.value.code == 2
    assert capsys.readouterr().err == ("error: invalid configuration: sampling.k = 1: must be >= 2; "
                                       "grpo.beta = -1.0: must be >= 0\n")


def test_run_job_turns_input_errors_into_one_line_and_keeps_bugs(capsys):
    def bad_input():
        raise PromptFileError("prompt file /nope.txt does not exist")

    def bug():
        raise ValueError("a bug")

    with pytest.raises(SystemExit) as info:
        run_job(bad_input)
    assert info.value.code == 2 and capsys.readouterr().err == "error: prompt file /nope.txt does not exist\n"

    class RemoteError(Exception):  # what a RayTaskError looks like from here: the remote exception as .cause
        cause = PromptFileError("prompt file x.parquet has no 'prompt' column")

    with pytest.raises(SystemExit):
        run_job(lambda: (_ for _ in ()).throw(RemoteError()))
    assert "has no 'prompt' column" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug"):
        run_job(bug)


def test_job_config_error_is_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "step_grpo.py"), "sampling.k=1",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: invalid configuration: sampling.k = 1: must be >= 2 for "
                                                "policy-gradient training (advantages need a group)"]
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_progress_off_a_terminal_prints_at_most_the_asked_lines_and_the_last():
    stream = io.StringIO()  # not a TTY: plain lines
    bar = Progress(100, 0, "train_drm", stream=stream, unit="step", lines=10)
    for step in range(10, 101, 10):
        bar.update(step, "loss 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[train_drm] step 100/100 loss 0.5 |")
    stream = io.StringIO()
    bar = Progress(1000, 0, "x", stream=stream, unit="step", lines=10)
    for step in range(1, 1001):
        bar.update(step, "")
    steps = [int(line.split()[2].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert steps == list(range(100, 1001, 100))


def test_progress_eta_counts_the_steps_done_since_its_clock_started():
    # the RL driver makes its bar after iteration 1 is done, with the clock set to when iteration 1 began: at step
    # 2 of 20 after 2 x 10 s, 18 steps are left at 10 s each -> 3m00s (counting from its own creation it said 1m30s)
    import time

    stream = io.StringIO()
    bar = Progress(20, 0, "grpo", stream=stream, start=time.perf_counter() - 20.0)
    bar.update(2, "reward +0.1")
    assert stream.getvalue().strip().endswith("| 20s elapsed, eta 3m00s")


def test_every_script_with_a_main_runs_it_when_executed():
    """A bench/ or jobs/ script that defines main() and never calls it exits 0 having done nothing (as
    bench/drm_breakdown.py once did): each must end in the `if __name__ == "__main__":` guard."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in sorted([*root.glob("bench/*.py"), *root.glob("jobs/*.py")]):
        tree = ast.parse(path.read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if not guarded:
            missing.append(path.relative_to(root).as_posix())
    assert not missing, f"scripts defining main() without the __main__ guard: {missing}"
