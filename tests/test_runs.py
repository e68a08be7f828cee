"""Run directories: atomic results, resume after interruption gives identical numbers, conflicting args refused."""
import json

import pytest

from biaslab.auditing import audit
from biaslab.benchmarks import BENCHMARKS
from biaslab.benchmarks.base import Benchmark, MetricDef, Protocol
from biaslab.errors import RunConflictError, UnknownNameError

CALLS = {"n": 0, "fail_after": None}


class ToyBench(Benchmark):
    """Scores each sentence's log-likelihood under the tiny model; metric = share with mean logprob > -11."""
    name = "toy"
    protocols = (Protocol("ll", "toy.ll.v1", "log-likelihood"),)
    default_protocol = "ll"
    chunk_size = 3
    options = {"k": 1}

    def load_items(self):
        return [{"id": f"t{i}", "group": "ab"[i % 2], "text": f"Sentence number {i} is here."} for i in range(10)]

    def score(self, lm, items, *, protocol):
        CALLS["n"] += 1
        if CALLS["fail_after"] is not None and CALLS["n"] > CALLS["fail_after"]:
            raise KeyboardInterrupt("simulated kill")
        s = lm.loglikelihood([("", it["text"]) for it in items])
        return [{"id": it["id"], "group": it["group"], "mean_lp": x.mean_logprob} for it, x in zip(items, s)]

    def metric_defs(self, protocol):
        return [MetricDef("share_high", lambda rs: sum(r["mean_lp"] > -11 for r in rs) / len(rs), "toy"),
                MetricDef("mean_lp", lambda rs: sum(r["mean_lp"] for r in rs) / len(rs), "toy")]


@pytest.fixture(autouse=True)
def _register():
    BENCHMARKS.register("toy", "test_runs:ToyBench")
    CALLS.update(n=0, fail_after=None)
    yield


def test_resume_after_interruption_is_identical(tiny_lm, tmp_path):
    full = audit(tiny_lm, ["toy"], out=tmp_path / "full", n_boot=50)
    CALLS.update(n=0, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        audit(tiny_lm, ["toy"], out=tmp_path / "part", n_boot=50)
    assert not (tmp_path / "part" / "results.json").exists()  # nothing half-written
    journal = (tmp_path / "part" / "records.jsonl").read_text().splitlines()
    assert sum('"chunk_done"' in line for line in journal) == 2
    CALLS.update(n=0, fail_after=None)
    resumed = audit(tiny_lm, ["toy"], out=tmp_path / "part", n_boot=50)
    assert CALLS["n"] == 2  # only the 2 unfinished chunks (of 4) were scored again
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "part" / "results.json").read_text())
    assert a["benchmarks"] == b["benchmarks"]
    assert full.results["benchmarks"]["toy"]["metrics"]["mean_lp"]["value"] == resumed.metric("toy", "mean_lp")
    man = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert man["status"] == "finished" and man["args"]["protocols"] == {"toy": "toy.ll.v1"}
    assert man["model"]["fingerprint"].startswith("sha256:")


def test_the_package_audit_stays_callable(tiny_lm, tmp_path):
    """``biaslab.audit(...)`` is the documented API: it stays the function after its module is imported (a
    submodule named ``audit`` replaced it on the package at the first call, so the second call failed)."""
    import importlib

    import biaslab

    importlib.import_module("biaslab.auditing")
    first = biaslab.audit(tiny_lm, "toy", limit=4, n_boot=10)
    second = biaslab.audit(tiny_lm, "toy", limit=4, n_boot=10, out=tmp_path / "r")
    assert callable(biaslab.audit) and first.results["benchmarks"] == second.results["benchmarks"]


def test_torn_journal_line_is_dropped(tiny_lm, tmp_path):
    audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20)
    good = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "records.jsonl", "a") as f:
        f.write('{"id": "t0", "benchmark": "toy", "chu')
    again = audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20)
    assert again.results["benchmarks"] == good["benchmarks"]


def test_different_arguments_refused_unless_force(tiny_lm, tmp_path):
    audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20, limit=6)
    with pytest.raises(RunConflictError, match="limit"):
        audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20, limit=4)
    res = audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20, limit=4, force=True)
    assert res.results["benchmarks"]["toy"]["n_items"] == 4


def test_groups_and_results_shape(tiny_lm, tmp_path):
    res = audit(tiny_lm, ["toy"], out=tmp_path, n_boot=20)
    sec = res.results["benchmarks"]["toy"]
    assert sec["protocol"] == "toy.ll.v1" and sec["n_items"] == 10
    assert set(sec["groups"]) == {"a", "b"} and sec["groups"]["a"]["n_items"] == 5
    assert set(sec["metrics"]["mean_lp"]) >= {"value", "ci95"}
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")


def test_unknown_option_and_protocol(tiny_lm):
    with pytest.raises(UnknownNameError, match="Did you mean 'll'"):
        audit(tiny_lm, ["toy"], protocols={"toy": "lll"})
    with pytest.raises(UnknownNameError, match="option"):
        audit(tiny_lm, ["toy"], options={"toy": {"kk": 2}})


def test_read_records_returns_finished_chunks_only(tmp_path):
    from biaslab.runs import RunDir, read_records

    rd = RunDir(tmp_path, {"a": 1})
    rd.append_chunk("b1", 0, [{"id": "x", "v": 1}, {"id": "y", "v": 2}])
    rd.append_chunk("b2", 0, [{"id": "z", "v": 3}])
    with open(rd.journal, "a", encoding="utf-8") as f:  # an unfinished chunk, then a torn line
        f.write(json.dumps({"benchmark": "b1", "chunk": 1, "id": "w", "v": 4}) + "\n" + '{"benchmark": "b1", "ch')
    assert read_records(tmp_path) == [{"id": "x", "v": 1}, {"id": "y", "v": 2}, {"id": "z", "v": 3}]
    assert read_records(tmp_path, "b2") == [{"id": "z", "v": 3}]
    assert read_records(tmp_path / "missing") == []
    RunDir(tmp_path, {"a": 1})  # reopening drops the unfinished chunk and the torn line from the journal
    assert read_records(tmp_path) == [{"id": "x", "v": 1}, {"id": "y", "v": 2}, {"id": "z", "v": 3}]
    lines = rd.journal.read_text().splitlines()
    assert lines[-1] == '{"benchmark": "b2", "chunk_done": 0}' and all(json.loads(x) for x in lines)
