"""Contract tests run over every patch kind and every registered method, on a tiny random Llama built here.

Every patch kind: save / load round trip, ``applied()`` restores every weight bit for bit, a patch for another
base is refused naming both fingerprints, and export reloads with the patched logits (where the kind exports).
Every registered method: fit through the registry and the runner on a tiny config, the summary validates against
the one schema, and a run killed half-way and rerun ends with the same summary as an uninterrupted run.
A method added to the registry without a tiny config here fails ``test_every_method_has_a_tiny_config``.
"""
from __future__ import annotations

import json

import pytest
import torch

from biaslab.errors import PatchMismatchError
from biaslab.evaluation import run_mitigation, validate_summary
from biaslab.methods import METHODS
from biaslab.models import LanguageModel
from biaslab.patches import PATCH_KINDS, load_patch

from conftest import make_tiny_llama

PROBE = "The nurse said that the doctor would be late."


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _logits(lm):
    with torch.no_grad():
        return lm.model(torch.tensor([lm.encode(PROBE)])).logits.float()


def _make_patch(kind: str, lm):
    g = torch.Generator().manual_seed(1)
    if kind == "neuron-mask":
        from biaslab.models.sites import find_sites
        from biaslab.patches import NeuronMaskPatch

        s = find_sites(lm.model, "ffn")
        return NeuronMaskPatch.from_units(lm, {s[0].name: [1, 5], s[1].name: [2]}, sites="ffn")
    if kind == "weights":
        from biaslab.methods.fast.training import ftl_patch
        from biaslab.tracing import layer_modules

        mlp = layer_modules(lm.model)[1][1]
        return ftl_patch(lm, 1, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in mlp.state_dict().items()})
    if kind == "stamp":
        from biaslab.methods.fast.stamp import StampFFN, StampPatch

        st = StampFFN(lm.model.config.hidden_size, 8, "silu")   # the exportable form (the model's own activation)
        with torch.no_grad():
            st.w2.weight.normal_(0, 0.5, generator=g)
            st.w2.bias.normal_(0, 0.5, generator=g)
        return StampPatch.from_stamp(lm, st, layer=1, activation="silu")
    if kind == "lora":
        from biaslab.methods.srllm.lora import LoraPatch

        w = {}
        for name, mod in lm.model.named_modules():
            if name.endswith(("q_proj", "down_proj")):
                w[name] = (torch.randn(4, mod.in_features, generator=g) * 0.1, torch.randn(mod.out_features, 4, generator=g) * 0.1)
        return LoraPatch.from_weights(lm, w, params={"r": 4, "alpha": 8.0, "scale": 2.0})
    if kind == "calibration":
        from biaslab.methods.calibration.patch import CalibrationPatch

        ids = [lm.candidate_token_id(c) for c in (" late", " early", "A")]
        return CalibrationPatch.from_probs(lm, ids, [0.7, 0.2, 0.1], params={"method": "cc"})
    raise AssertionError(f"no tiny patch for kind {kind!r}: add one to _make_patch")


@pytest.fixture
def lm():
    model, tok = make_tiny_llama()
    return LanguageModel(model, tok, spec="tiny-llama")


@pytest.mark.parametrize("kind", PATCH_KINDS.names())
def test_patch_kind_contract(kind, lm, tmp_path):
    p = _make_patch(kind, lm)
    assert p.kind == kind
    base_state, base_logits = _state(lm), _logits(lm)
    with p.applied(lm):
        patched = _logits(lm)
    assert not torch.allclose(patched, base_logits)  # the patch does something
    assert all(torch.equal(v, base_state[k]) for k, v in lm.model.state_dict().items())  # restored bit for bit
    q = load_patch(p.save(tmp_path / "p.safetensors"))
    assert (q.kind, q.base_fingerprint, q.params) == (p.kind, p.base_fingerprint, json.loads(json.dumps(p.params)))
    with q.applied(lm):
        assert torch.equal(_logits(lm), patched)
    model2, tok = make_tiny_llama(seed=1)
    other = LanguageModel(model2, tok, spec="other")
    with pytest.raises(PatchMismatchError) as e:
        with q.applied(other):
            pass
    assert lm.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    if q.exportable:
        from transformers import AutoModelForCausalLM

        out = q.export(lm, tmp_path / "exported")
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            got = plain(torch.tensor([lm.encode(PROBE)])).logits.float()
        # a patch that cannot live in the weights exports the base model and itself as a note
        assert torch.allclose(got, patched if q.bakes_into_weights else base_logits, atol=1e-4)
        if not q.bakes_into_weights:
            assert (out / "calibration.json").is_file() and "Nothing in the weights" in (out / "README.md").read_text()
        assert json.loads((out / "biaslab_patch.json").read_text())["export_check"]["max_abs_logit_diff"] <= 1e-3


# tiny settings per method: (task, config, limit)
TINY = {
    "crispr": ("sst2", {"neurons": 3, "instructions": 1, "dev_size": 4, "control_seeds": 1, "retention_limit": 4,
                        "retention_benchmarks": ("crows",)}, 8),
    "fast": ("stereoset:religion", {"steps": 2, "retention_limit": 2, "n_trace": 2, "n_noise": 1, "ftl_lrs": (1e-3,),
                                    "text_tokens": 8, "n_text": 2, "n_subject_prompts": 2}, 3),
    "cc": ("sst2", {"instructions": 1}, 6),
    "dc": ("sst2", {"instructions": 1, "dc_samples": 3}, 6),
    "srllm": ("debias_rewrites", {"train_limit": 6, "val_limit": 3, "batch_size": 3, "max_length": 96, "eval_every": 1,
                                  "retention": False}, 3),
}


def test_every_method_has_a_tiny_config():
    assert sorted(TINY) == METHODS.names()


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timings_s"}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, lm, tmp_path, monkeypatch):
    from biaslab.runs import RunDir

    task, cfg, limit = TINY[name]
    method = METHODS.get(name)()
    assert method.config_class is type(method.make_config(cfg))
    clean = run_mitigation(name, lm, task, cfg, out=tmp_path / "clean", limit=limit, n_boot=20)
    assert validate_summary(clean) is clean and clean["method"] == name
    assert load_patch(tmp_path / "clean" / "patch.safetensors").kind == clean["patch"]["kind"]
    for f in ("manifest.json", "summary.json", "report.html", "items.json", "before/records.jsonl",
              "after/records.jsonl", "fit/fit.json"):
        assert (tmp_path / "clean" / f).is_file(), f
    man = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert man["data_sha256"] and all(v.startswith("sha256:") for v in man["data_sha256"].values())

    # killed half-way (after the first journaled chunk), then rerun: the same summary
    calls = {"n": 0}
    orig = RunDir.append_chunk

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, *a, **k)
    monkeypatch.setattr(RunDir, "append_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run_mitigation(name, lm, task, cfg, out=tmp_path / "killed", limit=limit, n_boot=20)
    monkeypatch.setattr(RunDir, "append_chunk", orig)
    resumed = run_mitigation(name, lm, task, cfg, out=tmp_path / "killed", limit=limit, n_boot=20)
    assert _strip(resumed) == _strip(clean)

    # every method's run compares with another (its after state and retention audit): the same run, no difference
    from biaslab.signoff.compare import compare_runs

    cmp = compare_runs([tmp_path / "clean", tmp_path / "killed"], n_boot=20)
    assert cmp["rows"], "a mitigation run has metrics to compare"
    after = {(m["set"], k): m["after"] for k, m in clean["metrics"].items()}
    checked = 0
    for row in cmp["rows"]:
        d = row["deltas"][0]
        assert d["paired"] and d["delta"] in (0, None), row
        if (row["scope"], row["metric"]) in after:   # the after state's value, as the summary has it
            want, got = after[row["scope"], row["metric"]], row["values"][0]["value"]
            assert (want is None and got is None) or got == pytest.approx(want, abs=1e-9), row
            checked += 1
    assert checked == len(after)
    from biaslab.signoff.compare import write_html

    page = write_html(cmp, tmp_path / "compare.html").read_text()
    assert "Leaderboard" in page and str(tmp_path / "killed") in page

    # every method's summary prints in each --format: csv one row per metric (task and retention), json the summary
    import csv
    import io

    from biaslab.evaluation.report import render_summary

    assert json.loads(render_summary(clean, "json")) == json.loads(json.dumps(clean))
    rows = list(csv.DictReader(io.StringIO(render_summary(clean, "csv"))))
    n_ret = sum(len(s["metrics"]) for s in ((clean["retention"] or {}).get("benchmarks") or {}).values())
    assert len(rows) == len(clean["metrics"]) + n_ret
    for r in rows[:len(clean["metrics"])]:
        m = clean["metrics"][r["metric"]]
        assert r["scope"] == m["set"] and r["verdict"] == m["verdict"]
        assert (r["after"] == "" and m["after"] is None) or float(r["after"]) == pytest.approx(m["after"])
    md = render_summary(clean, "markdown", method.headline(clean))
    assert md.startswith(f"**{name} on {clean['task']}**") and all(k in md for k in clean["metrics"])
