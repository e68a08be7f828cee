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


@pytest.fixture
def in_process_cli(monkeypatch):
    """What main()'s quiet_libraries() changes in this process (warnings, environment) is undone after the test."""
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for var in ("TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(var, raising=False)   # restored (removed) after the test


def test_biaslab_warnings_print_as_one_line(in_process_cli):
    import warnings

    import biaslab
    from biaslab.cli import quiet_libraries

    quiet_libraries()
    ours = str(Path(biaslab.__file__).parent / "models" / "loading.py")
    assert warnings.formatwarning("cuda: no bf16", UserWarning, ours, 113) == "warning: cuda: no bf16\n"
    other = warnings.formatwarning("x", UserWarning, "/elsewhere/biaslab/lib.py", 3)
    assert other.startswith("/elsewhere/biaslab/lib.py:3: UserWarning: x")


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.06 GiB is free. Including non-PyTorch memory, this process has 78.03 GiB memory in use. Of the "
            "allocated memory 76.2 GiB is allocated by PyTorch. See documentation for Memory Management")


@pytest.mark.parametrize("argv,advice", [
    (["mitigate", "crispr", "--out", "r"], "--checkpoint-layers, --layers-per-pass 1"),
    (["mitigate", "srllm", "-o", "r"], "--micro-batch-size 1"),
    (["mitigate", "fast", "--out", "r"], "--micro-batch-pairs 1"),
    (["probe", "softprompt", "--out", "r"], "--micro-batch-size 1"),
    (["export", "p.safetensors"], None),
    (["rewrite", "-o", "r.jsonl", "text"], None)])   # rewrite's -o is one file written at the end, not a run
def test_out_of_memory_is_one_line_with_what_to_lower(argv, advice, monkeypatch, capsys, in_process_cli):
    """A GPU OOM was a torch traceback; it is torch's first sentences, whether work was kept, and the command's
    own memory options (each named option exists: checked against the command's --help)."""
    import torch

    from biaslab import cli

    msg = cli.out_of_memory_message(torch.OutOfMemoryError(CUDA_OOM), argv)
    assert msg.startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                          "of 79.10 GiB of which 1.06 GiB is free.") and "Including non-PyTorch" not in msg
    assert ("Finished chunks are kept" in msg) == (argv[0] not in ("export", "rewrite")) and "--device-map auto" in msg
    if advice:
        assert advice in msg
        helptext = subprocess.run([sys.executable, "-m", "biaslab", *argv[:2], "--help"], capture_output=True,
                                  text=True, env={**__import__("os").environ, "COLUMNS": "250"}).stdout
        for flag in (w.strip(",") for w in advice.split() if w.startswith("--")):
            assert flag in helptext, (flag, argv)
    assert cli.out_of_memory_message(RuntimeError("shape mismatch"), argv) is None
    assert "MPS backend" in cli.out_of_memory_message(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"),
                                                      argv)

    def boom(**kw):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr(sys, "argv", ["biaslab", *argv])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: out of memory: CUDA out of memory.") and "Traceback" not in err


def test_every_command_is_either_shared_by_ranks_or_run_by_rank_0_alone():
    """Under torchrun a command either shares its work (audit, mitigate, probe, env) or runs on rank 0 alone
    (cli.ONE_PROCESS_COMMANDS); a new command must be put on one side, and the set names only real commands."""
    import typer

    from biaslab.cli import ONE_PROCESS_COMMANDS, app

    names = set(typer.main.get_command(app).commands)
    assert ONE_PROCESS_COMMANDS <= names
    assert names - ONE_PROCESS_COMMANDS == {"audit", "mitigate", "probe", "env", "rewrite"}
