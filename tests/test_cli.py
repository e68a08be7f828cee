"""CLI bad-input handling: one clear line on stderr, exit code 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args):
    p = subprocess.run([sys.executable, "-m", "biaslab.cli", *args], capture_output=True, text=True, timeout=120,
                       env={"BIASLAB_PROGRESS": "0", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())})
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("args,expect", [
    (["audit", "--bench", "bbqq", "--out", "/tmp/x-never"], "Did you mean 'bbq'"),
    (["audit", "--bench", "crows", "--limit", "0", "--out", "/tmp/x-never"], "--limit must be a positive"),
    (["audit", "--bench", "crows", "--limit", "-3", "--out", "/tmp/x-never"], "--limit must be a positive"),
    (["audit", "--model", "smollm2-135m-instruc", "--bench", "crows", "--out", "/tmp/x-never"], "Did you mean 'smollm2-135m-instruct'"),
    (["audit", "--bench", "crows", "--protocol", "crows", "--out", "/tmp/x-never"], "BENCH=VALUE"),
    (["export", "--patch", "/nonexistent.safetensors", "--out", "/tmp/x-never"], "patch file not found"),
    # user input quoted in a message is printed as given, never read as rich markup
    (["mitigate", "crispr", "--task", "mc:/tmp/x-never/[bold]tasks.jsonl", "--neurons", "1", "--out", "/tmp/x-never"],
     "/tmp/x-never/[bold]tasks.jsonl: task file not found"),
])
def test_cli_errors_are_one_clear_line(args, expect):
    code, out = run(*args)
    assert code == 2, out
    assert expect in out
    assert "Traceback" not in out


def test_benchmarks_and_models_list():
    code, out = run("benchmarks")
    assert code == 0 and "bbq" in out
    code, out = run("models")
    assert code == 0 and "smollm2-135m-instruct" in out


def test_biaslab_warnings_print_as_one_line(monkeypatch):
    import warnings

    import biaslab
    from biaslab.cli import quiet_libraries

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for var in ("TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(var, raising=False)   # restored (removed) after the test
    quiet_libraries()
    ours = str(Path(biaslab.__file__).parent / "models" / "loading.py")
    assert warnings.formatwarning("cuda: no bf16", UserWarning, ours, 113) == "warning: cuda: no bf16\n"
    other = warnings.formatwarning("x", UserWarning, "/elsewhere/biaslab/lib.py", 3)
    assert other.startswith("/elsewhere/biaslab/lib.py:3: UserWarning: x")
