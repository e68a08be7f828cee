"""Reliability, one test per class of fault (issue 15; docs/RELIABILITY.md): nothing a user owns is deleted or
overwritten, numbers biaslab cannot vouch for are refused, and every fault is one clear line. Tiny models and
temp dirs only; every test that writes does so inside a sandbox directory it creates."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from biaslab.errors import BiaslabError, DataError, RunConflictError, UnknownNameError
from biaslab.models import LanguageModel
from biaslab.patches import NeuronMaskPatch, load_patch

from conftest import make_tiny_llama


@pytest.fixture
def lm():
    model, tok = make_tiny_llama()
    return LanguageModel(model, tok, spec="tiny-llama")


def _mask(lm, units=(1, 2)):
    from biaslab.models.sites import find_sites

    return NeuronMaskPatch.from_units(lm, {find_sites(lm.model)[0].name: list(units)}, sites="ffn")


# ------------------------------------------------------------------------------------------------ data loss
def test_export_never_deletes_a_directory_it_did_not_create(lm, tmp_path, monkeypatch):
    sandbox = tmp_path / "sandbox"
    mine = sandbox / "user-dir"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    p = _mask(lm)
    with pytest.raises(BiaslabError, match="not a biaslab export"):
        p.export(lm, mine)
    assert (mine / "thesis.txt").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.txt"]
    with pytest.raises(BiaslabError, match="not a biaslab export"):
        p.export(lm, sandbox)                       # the parent: refused, nothing touched
    assert (mine / "thesis.txt").is_file()
    # the CLI refuses before it loads the model (a 70 B load is no way to learn that --out is taken)
    from typer.testing import CliRunner

    import biaslab.models as M
    from biaslab.cli import app

    f = p.save(tmp_path / "p.safetensors")
    loaded = []
    monkeypatch.setattr(M, "load_model", lambda *a, **k: loaded.append(a))
    r = CliRunner().invoke(app, ["export", "--model", "x", "--patch", str(f), "--out", str(mine)])
    assert isinstance(r.exception, BiaslabError) and "not a biaslab export" in str(r.exception) and not loaded
    # --force adds the export's files beside the user's, deleting and overwriting nothing
    out = p.export(lm, mine, force=True)
    assert (out / "thesis.txt").read_text() == "years of work" and (out / "biaslab_patch.json").is_file()
    with pytest.raises(BiaslabError, match="would overwrite"):
        p.export(lm, mine, force=True)              # a second forced export would overwrite the first's files
    with pytest.raises(BiaslabError, match="not a biaslab export"):
        p.export(lm, mine)                          # and a plain one never replaces a directory biaslab did not create
    assert (mine / "thesis.txt").read_text() == "years of work"
    # an export of biaslab's own is replaced whole; no temp directory is left anywhere
    own = p.export(lm, sandbox / "export")
    p.export(lm, own)
    assert (own / "biaslab_patch.json").is_file()
    assert not [x for x in sandbox.iterdir() if ".tmp" in x.name]


def test_a_directory_is_new_a_resumable_run_or_refused(tmp_path):
    from biaslab.runs import RunDir

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": 1}')
    with pytest.raises(RunConflictError, match="not a biaslab run directory"):
        RunDir(foreign, {"a": 1}, force=True)        # --force never takes over a foreign directory
    assert (foreign / "results.json").read_text() == '{"mine": 1}' and sorted(os.listdir(foreign)) == ["results.json"]
    run = RunDir(tmp_path / "run", {"a": 1})
    run.append_chunk("x", 0, [{"id": "i", "v": 1}])
    (run.path / "summary.json").write_text("{}")
    run.finish()
    with pytest.raises(RunConflictError, match="different arguments"):
        RunDir(tmp_path / "run", {"a": 2})
    again = RunDir(tmp_path / "run", {"a": 2}, force=True)   # --force replaces the whole run it owns
    assert not (again.path / "summary.json").exists() and again.finished_chunk("x", 0) is None
    again.finish()


LOCKER = """
import sys, time
from biaslab.outputs import DirLock
DirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_two_processes_never_share_a_run_directory_and_a_dead_holder_frees_it(tmp_path):
    from biaslab.runs import RunDir

    d = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(BiaslabError, match=f"in use by another biaslab process \\(pid {proc.pid}\\)"):
            RunDir(d, {"a": 1})
    finally:
        proc.kill()   # SIGKILL: the OS drops the lock of the dead process
        proc.wait()
    RunDir(d, {"a": 1}).finish()   # a stale lock never blocks the rerun


# ------------------------------------------------------------------------------------------------ silently wrong numbers
def test_the_converted_cache_is_verified_against_its_recorded_hashes(tmp_path):
    from safetensors.torch import save_file

    from biaslab.models.loading import _file_record, cache_problem

    entry = tmp_path / "models" / "m-1"
    entry.mkdir(parents=True)
    assert "did not finish" in cache_problem(entry)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(entry / "model.safetensors"))
    (entry / "biaslab.json").write_text(json.dumps({"files": {"model.safetensors": _file_record(entry / "model.safetensors")}}))
    assert cache_problem(entry) is None
    # altered, still valid safetensors of the same size: refused by its hash
    save_file({"w": torch.arange(64, dtype=torch.float32) * 2}, str(entry / "model.safetensors"))
    assert "was altered" in cache_problem(entry)
    with open(entry / "model.safetensors", "r+b") as f:   # truncated
        f.truncate(100)
    assert "100 bytes where" in cache_problem(entry)
    (entry / "biaslab.json").write_text(json.dumps({"source": "old"}))
    assert "older biaslab" in cache_problem(entry)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([-1]), "negative unit index"),
    (torch.tensor([[1, 2], [3, 4]]), "1-D integer"),
    (torch.tensor([1.0, 2.0]), "1-D integer"),
    (torch.tensor([], dtype=torch.long), "non-empty"),
    (torch.tensor([3, 3]), "repeats"),
])
def test_patch_tensors_are_validated_before_the_model_is_touched(lm, bad, match, tmp_path):
    from biaslab.models.sites import find_sites

    site = find_sites(lm.model)[0].name
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    p = NeuronMaskPatch(base_fingerprint=lm.fingerprint, params={"sites": "ffn"}, tensors={f"units.{site}": bad})
    with pytest.raises(BiaslabError, match=match):
        with p.applied(lm):
            pass
    p.save(tmp_path / "bad.safetensors")
    with pytest.raises(BiaslabError, match=match):
        load_patch(tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_a_patch_that_fails_half_way_leaves_the_model_as_it_was(lm):
    from biaslab.models.sites import find_sites

    s = find_sites(lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    p = NeuronMaskPatch.from_units(lm, {s[0].name: [0, 1], s[1].name: [10_000]}, sites="ffn")  # 2nd site out of range
    with pytest.raises(BiaslabError, match="prunes unit 10000"):
        with p.applied(lm):
            pass
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("meta, match", [
    ("not json", "not JSON"), ("[1, 2]", "not a JSON object"), ('{"params": {}}', "no 'base_fingerprint'"),
    ('{"base_fingerprint": "x", "params": 3}', "'params' is not an object"),
])
def test_patch_metadata_faults_are_one_clear_line(meta, match, tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "p.safetensors"
    save_file({"units.a": torch.tensor([1])}, str(f), metadata={"biaslab.kind": "neuron-mask", "biaslab.meta": meta})
    with pytest.raises(BiaslabError, match=match) as e:
        load_patch(f)
    assert str(f) in str(e.value)


# ------------------------------------------------------------------------------------------------ options
def test_options_are_never_silently_coerced_or_ignored(tmp_path):
    from typer.testing import CliRunner

    from biaslab.auditing import audit
    from biaslab.cli import app
    from biaslab.evaluation import run_mitigation

    r = CliRunner().invoke(app, ["mitigate", "crispr", "--task", "sst2", "--neurons", "2", "--dev-size", "0",
                                 "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, BiaslabError) and "--dev-size" in str(r.exception)
    with pytest.raises(BiaslabError, match="--n-boot"):
        audit("unused", "crows", n_boot=-5)
    with pytest.raises(BiaslabError, match="--n-boot"):
        run_mitigation("crispr", "unused", "sst2", {"neurons": 1}, out=tmp_path / "y", n_boot=-5)
    with pytest.raises(BiaslabError, match="--instructions sets the BBQ"):
        audit("unused", "crows", instructions=3)
    r = CliRunner().invoke(app, ["audit", "--bench", "bbq", "--protocol", "bbq=letter", "--protocol",
                                 "bbq=option-loglik", "--out", str(tmp_path / "z")])
    assert isinstance(r.exception, BiaslabError) and "given twice" in str(r.exception)
    for out in ("", "  "):
        with pytest.raises(BiaslabError, match="--out is empty"):
            audit("unused", "crows", out=out)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_reserved_line_field_in_a_task_file_is_refused(tmp_path):
    from biaslab.tasks import load_mc_file

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"context": "c", "options": ["a", "b"], "gold": 0, "_line": 7}) + "\n")
    with pytest.raises(DataError, match="line 1: field '_line'"):
        load_mc_file(f)


# ------------------------------------------------------------------------------------------------ file-system faults
def test_file_system_faults_are_one_clear_line(tmp_path, monkeypatch):
    from biaslab.runs import RunDir, atomic_write_text

    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(BiaslabError, match="is a file"):
        RunDir(f, {})
    with pytest.raises(BiaslabError, match="lies under .*a-file, which is a file"):
        RunDir(f / "run", {})
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    for force in (False, True):
        with pytest.raises(BiaslabError, match="not readable JSON"):
            RunDir(bad, {"a": 1}, force=force)
    run = RunDir(tmp_path / "j", {"a": 1})
    run.finish()
    (run.path / "records.jsonl").write_text('[1, 2]\n{"benchmark": "x", "chunk_done": 0}\n')
    with pytest.raises(BiaslabError, match="line 1: not a biaslab journal record"):
        RunDir(run.path, {"a": 1})
    # a failed atomic write leaves no temp file behind
    target = tmp_path / "out.json"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(BiaslabError, match="cannot write .*out.json: No space left"):
        atomic_write_text(target, "data")
    assert not target.exists() and not [x for x in tmp_path.iterdir() if ".tmp" in x.name]


def test_rewrite_output_must_be_a_new_file(tmp_path):
    from typer.testing import CliRunner

    from biaslab.cli import app

    r = CliRunner().invoke(app, ["rewrite", "some text", "--output", str(tmp_path)])
    assert isinstance(r.exception, BiaslabError) and "is a directory" in str(r.exception)
    f = tmp_path / "mine.jsonl"
    f.write_text("keep")
    r = CliRunner().invoke(app, ["rewrite", "some text", "--output", str(f)])
    assert isinstance(r.exception, BiaslabError) and "already exists" in str(r.exception) and f.read_text() == "keep"


# ------------------------------------------------------------------------------------------------ model loading
def test_model_loading_faults_are_one_clear_line(tmp_path):
    import torch

    from biaslab.models import load_model

    junk = tmp_path / "random.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(BiaslabError, match="not a readable GGUF model"):
        load_model(str(junk))
    with pytest.raises(UnknownNameError, match="unknown device 'tpu'"):
        load_model("smollm2-135m-instruct", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BiaslabError, match="no CUDA device"):
            load_model("smollm2-135m-instruct", device="cuda")
    model, tok = make_tiny_llama()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    with open(d / "model.safetensors", "r+b") as f:   # truncated weights
        f.truncate(200)
    with pytest.raises(BiaslabError, match="could not load model"):
        load_model(str(d))


def test_a_model_directory_that_asks_to_run_its_own_code_is_refused(tmp_path):
    from biaslab.models import load_model

    model, tok = make_tiny_llama()
    d = tmp_path / "remote"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('model code ran')\n")
    with pytest.raises(BiaslabError, match="never runs code from a model directory"):
        load_model(str(d))


# ------------------------------------------------------------------------------------------------ console
def test_user_text_is_printed_literally_and_errors_exit_2(tmp_path):
    odd = tmp_path / "x[/b][red]y.safetensors"
    r = subprocess.run([sys.executable, "-m", "biaslab", "export", "--patch", str(odd), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "x[/b][red]y.safetensors" in r.stderr.replace("\n", "") and "Traceback" not in r.stderr


def test_ctrl_c_prints_how_to_resume_and_exits_130(monkeypatch, capsys):
    from biaslab import cli

    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.setattr(sys, "argv", ["biaslab", "audit", "--bench", "crows", "--out", "r"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["biaslab", "rewrite", "-o", "r.jsonl", "some text"])   # -o: one file, no run
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(sys, "argv", ["biaslab", "rewrite", "--out", "r", "some text"])

    monkeypatch.setattr(cli, "app", lambda **kw: 130)   # typer's own Exit(130) for an interrupt inside a command
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and "rerun the same command to resume" in capsys.readouterr().err


def test_a_killed_runs_results_are_marked_incomplete(tmp_path):
    from biaslab.runs import RunDir

    run = RunDir(tmp_path / "r", {"a": 1})
    run.write_results({"benchmarks": {}})
    assert json.loads((run.path / "results.json").read_text())["complete"] is False
    run.finish()
    assert json.loads((run.path / "results.json").read_text())["complete"] is True


def test_checks_that_need_no_model_run_before_it_loads(tmp_path, monkeypatch):
    import biaslab.models as models_pkg
    from biaslab.auditing import audit

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(models_pkg, "load_model", no_load)
    with pytest.raises(BiaslabError, match="--patch .*no such file"):
        audit("smollm2-135m-instruct", "crows", patch=tmp_path / "missing.safetensors")
    with pytest.raises(BiaslabError, match="a directory, not a patch file"):
        audit("smollm2-135m-instruct", "crows", patch=tmp_path)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(BiaslabError, match="is a file"):
        audit("smollm2-135m-instruct", "crows", out=f)
