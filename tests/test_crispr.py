"""CRISPR: pruning patches, search, splits, attribution aggregation, the full loop on a tiny model, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from biaslab.errors import BiaslabError, PatchMismatchError, UnknownNameError
from biaslab.evaluation import run_mitigation
from biaslab.methods import crispr as C
from biaslab.models import LanguageModel
from biaslab.models.sites import find_sites
from biaslab.patches import NeuronMaskPatch, load_patch
from biaslab.tasks import MCItem

from conftest import make_tiny_llama


def _items(n=30):
    pos = ["a gorgeous, witty film", "warm and funny", "a triumph", "lovely acting", "pure joy"]
    neg = ["a dull mess", "boring and long", "a waste of time", "flat and lifeless", "painful to watch"]
    out = []
    for k in range(n):
        lab = k % 2
        text = (pos if lab else neg)[k % 5] + f" #{k}"
        out.append(MCItem(id=f"t{k}", options=("negative", "positive"), gold=lab, context=text,
                          question="What is the sentiment of this movie review?", meta={"label": lab}))
    return out


def _logits(lm, text="Hello there, general Kenobi"):
    ids = torch.tensor([lm.encode(text)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


# ---------------------------------------------------------------- patches
@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_pruning_zeroes_exactly_the_chosen_neurons_and_is_reversible(tiny_lm, kind):
    sites = find_sites(tiny_lm.model, kind)
    units = {sites[0].name: [0, 5, 7], sites[-1].name: [3]}
    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    p = NeuronMaskPatch.from_units(tiny_lm, units, sites=kind)
    assert p.n_neurons == 4
    with p.applied(tiny_lm):
        after = tiny_lm.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        for s in (sites[0], sites[-1]):
            ix = torch.tensor(units[s.name])
            w = s.module.weight
            if kind == "ffn":  # columns of the down projection
                assert (w[:, ix] == 0).all()
                others = [i for i in range(w.shape[1]) if i not in units[s.name]]
                assert torch.equal(w[:, others], before[s.name + ".weight"][:, others])
            else:  # weight rows (and bias entries)
                assert (w[ix] == 0).all()
                others = [i for i in range(w.shape[0]) if i not in units[s.name]]
                assert torch.equal(w[others], before[s.name + ".weight"][others])
        assert changed == {sites[0].name + ".weight", sites[-1].name + ".weight"}
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-for-bit


def test_pruned_neuron_has_no_effect_on_the_output(tiny_lm):
    """Zeroing a down-projection column == forcing that intermediate activation to 0."""
    site = find_sites(tiny_lm.model, "ffn")[0]
    p = NeuronMaskPatch.from_units(tiny_lm, {site.name: [2, 9]}, sites="ffn")

    def pre(m, args):
        x = args[0].clone()
        x[..., [2, 9]] = 0
        return (x,)
    h = site.module.register_forward_pre_hook(pre)
    ref = _logits(tiny_lm)
    h.remove()
    with p.applied(tiny_lm):
        got = _logits(tiny_lm)
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, _logits(tiny_lm))


def test_patch_save_load_and_export_gives_patched_logits(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    sites = find_sites(tiny_lm.model, "ffn")
    p = NeuronMaskPatch.from_units(tiny_lm, {sites[1].name: [1, 2, 3]}, sites="ffn",
                                   params={"method": "crispr.v1"}, provenance={"task": "unit"})
    p.save(tmp_path / "patch.safetensors")
    q = load_patch(tmp_path / "patch.safetensors")
    assert q.kind == "neuron-mask" and q.units.keys() == p.units.keys() and q.provenance == {"task": "unit"}
    with q.applied(tiny_lm):
        patched = _logits(tiny_lm)
    q.export(tiny_lm, tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([tiny_lm.encode("Hello there, general Kenobi")])
    with torch.no_grad():
        exported = plain(input_ids=ids).logits
    assert torch.allclose(exported, patched, atol=1e-5)
    assert not torch.allclose(exported, _logits(tiny_lm), atol=1e-5)
    chk = json.loads((tmp_path / "exported" / "biaslab_patch.json").read_text())["export_check"]
    assert chk["max_abs_logit_diff"] <= 1e-5 and chk["atol"] == p.EXPORT_ATOL


def test_export_check_refuses_a_directory_that_does_not_reproduce_the_patch(tiny_lm, tmp_path, monkeypatch):
    """A broken bake (here: the unpatched weights written) fails the reload check; nothing is left behind."""
    sites = find_sites(tiny_lm.model, "ffn")
    p = NeuronMaskPatch.from_units(tiny_lm, {sites[1].name: list(range(16))}, sites="ffn")
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}

    def unpatched_copy(lm):
        import copy

        m = copy.deepcopy(lm.model)
        m.load_state_dict(before)
        return m
    monkeypatch.setattr(p, "_export_model", unpatched_copy)
    with pytest.raises(BiaslabError, match="export check failed"):
        p.export(tiny_lm, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []              # neither the target nor the temporary directory
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())   # patch undone
    p.export(tiny_lm, tmp_path / "unchecked", verify=False)   # --no-verify skips the check (and records none)
    assert "export_check" not in json.loads((tmp_path / "unchecked" / "biaslab_patch.json").read_text())
    assert "Not verified at export" in (tmp_path / "unchecked" / "README.md").read_text()   # and the card says so


def test_patch_for_another_base_is_refused_naming_both_fingerprints(tiny_lm):
    other_model, tok = make_tiny_llama(seed=7)
    other = LanguageModel(other_model, tok, spec="other-tiny")
    p = NeuronMaskPatch.from_units(tiny_lm, {find_sites(tiny_lm.model)[0].name: [0]}, sites="ffn")
    with pytest.raises(PatchMismatchError) as e:
        with p.applied(other):
            pass
    assert tiny_lm.fingerprint in str(e.value) and other.fingerprint in str(e.value)


# ---------------------------------------------------------------- search
@pytest.mark.parametrize("opt", [0, 1, 37, 123, 250, 499, 500])
def test_golden_section_search_finds_the_optimum_of_a_unimodal_function(opt):
    calls = []

    def f(n):
        calls.append(n)
        return -abs(n - opt) + 0.001 * math.cos(n)  # unimodal, no plateau

    best, seen = C.golden_section_search(f, 0, 500, 4)
    assert best == opt
    assert len(calls) == len(set(calls))  # each n evaluated once
    assert len(calls) <= 25  # far fewer than the 501 of a grid


def test_golden_section_search_ties_go_to_the_smaller_n_and_bad_tolerance():
    best, _ = C.golden_section_search(lambda n: 1.0 if 10 <= n <= 20 else 0.0, 0, 30, 4)
    assert 10 <= best <= 20
    assert C.golden_section_search(lambda n: 0.0, 0, 500, 4)[0] == 0
    with pytest.raises(BiaslabError, match="tolerance"):
        C.golden_section_search(lambda n: 0.0, 0, 10, 0)


# ---------------------------------------------------------------- splits and config
def test_split_is_seeded_disjoint_and_covers_everything():
    items = _items(50)
    dev, test = C.split_dev_test(items, dev_fraction=0.1, seed=0)
    assert len(dev) == 5 and len(test) == 45
    assert {i.id for i in dev}.isdisjoint({i.id for i in test})
    assert C.split_dev_test(items, seed=0)[0] == dev
    assert C.split_dev_test(items, seed=1)[0] != dev
    s = C.sample_items(test, 10, 0)
    assert len(s) == 10 and sum(i.gold for i in s) == 5 and s == C.sample_items(test, 10, 0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(BiaslabError, match="at least 2 options"):
        MCItem(id="x", options=("only",), gold=0)
    with pytest.raises(UnknownNameError, match="site kind"):
        C.CrisprConfig(sites="heads", neurons=3).validate()
    with pytest.raises(BiaslabError, match="--neurons N or --search"):
        C.CrisprConfig().validate()
    with pytest.raises(BiaslabError, match="exclusive"):
        C.CrisprConfig(neurons=3, search=True).validate()
    with pytest.raises(BiaslabError, match="--layers-per-pass must be ≥ 1"):
        C.CrisprConfig(neurons=3, layers_per_pass=0).validate()
    with pytest.raises(BiaslabError, match="supports the task protocols 'letter'"):
        C.CrisprConfig(neurons=3, protocol="generate").validate()
    with pytest.raises(UnknownNameError, match="reduction"):
        C.CrisprConfig(neurons=3, reduce="median").validate()


def test_random_control_matches_site_counts_and_seeds():
    sizes = {"a": 100, "b": 50}
    r0 = C.random_units(sizes, {"a": 3, "b": 2}, 0)
    assert {k: len(v) for k, v in r0.items()} == {"a": 3, "b": 2}
    assert r0 == C.random_units(sizes, {"a": 3, "b": 2}, 0) != C.random_units(sizes, {"a": 3, "b": 2}, 1)


# ---------------------------------------------------------------- attribution aggregation
def test_bias_scores_aggregation_options(tiny_lm):
    items = _items(4)

    def cfg(**kw):
        return C.CrisprConfig(neurons=5, instructions=2, **kw)

    s_full, st = C.bias_scores(tiny_lm, items, [0, 1], cfg())
    sites = find_sites(tiny_lm.model, "ffn")
    assert set(s_full) == {s.name for s in sites}
    assert all(v.shape == (s.n_units,) and torch.isfinite(v).all() for s, v in zip(sites, s_full.values()))
    assert st.n_instances == 8 and 0 < st.mean_confusion < 1
    # layer chunking (one layer's sites per pass) gives the very same scores and statistics
    chunked, st_c = C.bias_scores(tiny_lm, items, [0, 1], cfg(layers_per_pass=1))
    assert list(chunked) == list(s_full) and all(torch.equal(s_full[k], chunked[k]) for k in s_full)
    assert st_c.to_dict() == st.to_dict()
    # deterministic, and instance order / batching do not matter
    rev, _ = C.bias_scores(tiny_lm, items[::-1], [0, 1], cfg(token_budget=150))
    scale = max(float(v.abs().max()) for v in s_full.values())
    assert scale > 0
    assert all(torch.allclose(s_full[k], rev[k], atol=1e-3 * scale, rtol=1e-3) for k in s_full)  # float32 batch noise

    def differs(a, b):
        return any(not torch.allclose(a[k], b[k], atol=1e-2 * scale, rtol=1e-2) for k in a)
    # no skill disentanglement: B = α·A(ŷ) ≥ full score (the subtracted term is ≥ 0)
    s_noskill, _ = C.bias_scores(tiny_lm, items, [0, 1], cfg(skill_disentanglement=False))
    assert all((s_noskill[k] >= s_full[k]).all() for k in s_full) and differs(s_noskill, s_full)
    # no confusion weighting, mean reduction and the p-alpha convention change the scores
    for kw in ({"confusion_weighting": False}, {"reduce": "mean"}, {"objective": "prob"}):
        other, _ = C.bias_scores(tiny_lm, items, [0, 1], cfg(**kw))
        assert differs(other, s_full), kw


def test_fit_registry_and_provenance(tiny_lm):
    items = _items(40)
    p = C.fit(tiny_lm, items, {"neurons": 7, "instructions": 1, "dev_size": 4})
    assert isinstance(p, NeuronMaskPatch) and p.n_neurons == 7
    assert p.params["convention"] == "logp-alpha" and p.params["chosen_n"] == 7
    dev, test = C.split_dev_test(items)
    assert p.provenance["dev_ids_hash"] == C.ids_hash(dev) and p.provenance["n_test"] == len(test)
    assert p.base_fingerprint == tiny_lm.fingerprint


def test_search_uses_dev_only(tiny_lm):
    items = _items(40)
    seen = []
    import biaslab.methods.crispr.fitting as mod

    orig = mod.score_mc

    def spy(lm, its, *a, **k):
        seen.extend(i.id for i in its)
        return orig(lm, its, *a, **k)
    mod.score_mc = spy
    try:
        res = C.fit_details(tiny_lm, items, C.CrisprConfig(search=True, search_max=12, instructions=1, dev_size=4))
    finally:
        mod.score_mc = orig
    dev_ids = {i.id for i in res.dev}
    assert seen and set(seen) <= dev_ids
    assert 0 in res.search and res.n in res.search and res.search[res.n] == max(res.search.values())


def _run(lm, task, out, cfg, **kw):
    return run_mitigation("crispr", lm, task, cfg, out=out, **kw)


def test_full_loop_on_tiny_model(tiny_lm, tmp_path):
    out = tmp_path / "run"
    cfg = C.CrisprConfig(neurons=6, instructions=2, dev_size=4, control_seeds=2, retention=False)
    s = _run(tiny_lm, _items(40), out, cfg, n_boot=50)
    assert (s["method"], s["method_version"]) == ("crispr", "crispr.v1") and s["details"]["n_neurons"] == 6
    acc = s["metrics"]["accuracy"]
    assert set(acc) >= {"before", "after", "delta", "delta_ci95", "std_before", "std_after", "direction"}
    assert acc["delta"] == pytest.approx(acc["after"] - acc["before"]) and acc["direction"] == "higher"
    ctl = s["controls"]["random"]
    assert ctl["members"] == ["seed0", "seed1"] and len(ctl["metrics"]["accuracy"]["per_member"]) == 2
    for f in ("patch.safetensors", "summary.json", "report.html", "before/records.jsonl", "after/results.json",
              "controls/random/seed1/results.json", "controls/random/seed1/patch.safetensors",
              "fit/attribution.safetensors", "fit/fit.json", "items.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "items.json").read_text())["test"] == [it.id for it in C.sample_items(
        C.split_dev_test(_items(40))[1], None, 0)]
    assert json.loads((out / "summary.json").read_text())["metrics"]["accuracy"]["before"] == acc["before"]
    assert load_patch(out / "patch.safetensors").n_neurons == 6
    # a rerun resumes (same numbers, the fit is not redone) and a changed run is refused
    s2 = _run(tiny_lm, _items(40), out, cfg, n_boot=50)
    assert s2["metrics"] == s["metrics"] and s2["controls"] == s["controls"]
    with pytest.raises(BiaslabError, match="different arguments"):
        _run(tiny_lm, _items(40), out, C.CrisprConfig(neurons=7, instructions=2, dev_size=4, control_seeds=2,
                                                      retention=False), n_boot=50)


def test_cli_errors_are_clear():
    from typer.testing import CliRunner

    from biaslab.cli import app

    r = CliRunner().invoke(app, ["mitigate", "crispr", "--task", "sst2", "--neurons", "3", "--search", "--out", "/tmp/x"])
    assert isinstance(r.exception, BiaslabError) and "exclusive" in str(r.exception)
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--out", "/tmp/x", "--neurons", "3"])
    assert isinstance(r.exception, BiaslabError) and "--task" in str(r.exception)
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--task", "sst2", "--neurons", "3", "--span", "answers",
                                 "--out", "/tmp/x"])
    assert isinstance(r.exception, UnknownNameError) and "attribution span 'answers'. Did you mean 'answer'" in str(r.exception)


@pytest.mark.integration
def test_real_model_attribution_shapes(real_lm):
    from biaslab.task_specs import load_task

    _, items = load_task("sst2")
    sc, st = C.bias_scores(real_lm, items[:2], [0], C.CrisprConfig(neurons=5, instructions=1))
    assert len(sc) == 30 and all(v.shape == (1536,) and torch.isfinite(v).all() for v in sc.values())
    assert st.n_instances == 2


def test_retention_comparison_on_tiny_model(tiny_lm, tmp_path):
    from biaslab.evaluation.compare import retention_comparison

    p = NeuronMaskPatch.from_units(tiny_lm, {find_sites(tiny_lm.model)[0].name: list(range(10))}, sites="ffn")
    r = retention_comparison(tiny_lm, p, ["crows"], limit=6, seed=0, out=tmp_path / "ret", n_boot=20)
    m = r["crows"]["metrics"]["stereotype_score"]
    assert set(m) >= {"before", "after", "delta", "delta_ci95", "before_ci_width", "within_ci_width", "direction"}
    assert m["delta"] == pytest.approx(m["after"] - m["before"]) and (m["direction"], m["ideal"]) == ("ideal", 50.0)
    assert (tmp_path / "ret" / "after" / "results.json").is_file()


# ---------------------------------------------------------------- search objective (accuracy + gold-prob tie-break)
def _rec(instr, gold, lp):
    pred = max(range(len(lp)), key=lambda k: (lp[k], -k))
    return {"instruction": instr, "gold": gold, "logprobs": lp, "pred": pred, "correct": int(pred == gold)}


def test_search_objective_is_accuracy_with_a_lexicographic_gold_prob_tie_break():
    lg = math.log
    # a: always answers option 1 with p = 0.9 (acc 0.5); b: same answers, less sure (more gold mass on option 0)
    a = [_rec(i, g, [lg(0.1), lg(0.9)]) for i in (0, 1) for g in (0, 1)]
    b = [_rec(i, g, [lg(0.4), lg(0.6)]) for i in (0, 1) for g in (0, 1)]
    # c: one more correct answer than a, with a tiny gold probability elsewhere
    c = [_rec(0, 0, [lg(0.51), lg(0.49)]), _rec(0, 1, [lg(0.99), lg(0.01)]), _rec(1, 0, [lg(0.01), lg(0.99)]),
         _rec(1, 1, [lg(0.01), lg(0.99)])]
    acc = {k: C.search_objective_value(r, "accuracy") for k, r in (("a", a), ("b", b), ("c", c))}
    tb = {k: C.search_objective_value(r, "accuracy+goldprob") for k, r in (("a", a), ("b", b), ("c", c))}
    assert acc["a"] == acc["b"] == 0.5 and acc["c"] == 0.5  # c: instr 0 acc 0.5, instr 1 acc 0.5
    assert C.gold_prob_mean(a) == pytest.approx(0.5) and C.gold_prob_mean(b) == pytest.approx(0.5)
    assert tb["a"] == pytest.approx(0.5 + 0.5 / 5)
    # c has the same accuracy but less gold mass → loses the tie-break
    assert tb["c"] < tb["a"]
    # a strictly higher accuracy always wins, whatever the gold probabilities
    # d: 3 of 4 correct, but barely (gold mass 0.51 or 0.01) → mean gold probability far below a's
    d = [_rec(0, 1, [lg(0.49), lg(0.51)]), _rec(0, 0, [lg(0.51), lg(0.49)]), _rec(1, 1, [lg(0.49), lg(0.51)]),
         _rec(1, 0, [lg(0.01), lg(0.99)])]
    assert C.gold_prob_mean(d) < C.gold_prob_mean(a)
    assert C.accuracy_mean(d) > acc["a"] and C.search_objective_value(d, "accuracy+goldprob") > tb["a"]
    with pytest.raises(BiaslabError, match="search objective"):
        C.search_objective_value(a, "balanced")
    with pytest.raises(BiaslabError, match="search objective"):
        C.CrisprConfig(search=True, search_objective="nope").validate()


def test_condition_hmean_scores_the_always_unknown_collapse_zero():
    lg = math.log

    def rec(instr, cond, correct):
        r = _rec(instr, 0, [lg(0.9), lg(0.1)] if correct else [lg(0.1), lg(0.9)])
        return {**r, "context_condition": cond}

    # instruction 0: ambig 1/2 right, disambig 2/2 right → hmean 2·0.5·1/(1.5) = 2/3
    # instruction 1: ambig 2/2, disambig 1/2 → 2/3 as well; mean 2/3
    recs = [rec(0, "ambig", 1), rec(0, "ambig", 0), rec(0, "disambig", 1), rec(0, "disambig", 1),
            rec(1, "ambig", 1), rec(1, "ambig", 1), rec(1, "disambig", 1), rec(1, "disambig", 0)]
    assert C.search_objective_value(recs, "condition-hmean") == pytest.approx(2 / 3)
    # the collapse: every ambiguous item right ("unknown"), every disambiguated one wrong → 0, although its
    # plain accuracy (0.5) beats a model with ambig 1/4 and disambig 3/4 right (hmean 0.375, accuracy 0.5)
    collapse = [rec(0, "ambig", 1)] * 4 + [rec(0, "disambig", 0)] * 4
    mixed = [rec(0, "ambig", k < 1) for k in range(4)] + [rec(0, "disambig", k < 3) for k in range(4)]
    assert C.search_objective_value(collapse, "condition-hmean") == 0.0
    assert C.search_objective_value(mixed, "condition-hmean") == pytest.approx(2 * 0.25 * 0.75 / 1.0)
    assert C.accuracy_mean(collapse) == C.accuracy_mean(mixed) == 0.5
    with pytest.raises(BiaslabError, match="ambiguous and disambiguated"):
        C.search_objective_value([rec(0, "ambig", 1)], "condition-hmean")
    with pytest.raises(BiaslabError, match="condition-hmean needs BBQ items"):
        C.fit_details(None, _items(12), C.CrisprConfig(search=True, instructions=1, dev_size=4,
                                                       search_objective="condition-hmean"))


def test_search_with_gold_prob_tie_break_records_the_objective(tiny_lm):
    items = _items(40)
    cfg = C.CrisprConfig(search=True, search_max=8, instructions=1, dev_size=4, search_objective="accuracy+goldprob")
    res = C.fit_details(tiny_lm, items, cfg)
    assert 0 in res.search and res.search[res.n] == max(res.search.values())
    # values carry the tie-break: not all multiples of 1/K
    assert any(abs(v * 1000 - round(v * 1000)) > 1e-9 for v in res.search.values())
    assert any("gold probability" in d for d in res.patch.params["deviations"])
    assert res.patch.params["search_objective"] == "accuracy+goldprob"


def test_empty_patch_reuses_the_unpatched_records(tiny_lm, tmp_path, monkeypatch):
    import biaslab.tasks as tasks_mod

    calls = []
    orig = tasks_mod.score_mc

    def spy(lm, its, *a, **k):
        calls.append(k.get("desc"))
        return orig(lm, its, *a, **k)
    monkeypatch.setattr(tasks_mod, "score_mc", spy)
    cfg = C.CrisprConfig(neurons=0, instructions=2, dev_size=4, control_seeds=2, retention=False)
    s = _run(tiny_lm, _items(40), tmp_path / "run", cfg, n_boot=50)
    assert s["details"]["n_neurons"] == 0 and s["patch"]["identity"]
    assert calls == ["test", "test"]  # the before state's two chunks only: after and controls are not re-scored
    assert s["metrics"]["accuracy"]["delta"] == 0 and s["metrics"]["accuracy"]["after"] == s["metrics"]["accuracy"]["before"]
    assert s["controls"]["random"]["metrics"]["accuracy"]["method_minus_control"] == 0
    assert any("instead of scoring them again" in n for n in s["notes"])
    # resuming the finished run does not duplicate the reused records
    s2 = _run(tiny_lm, _items(40), tmp_path / "run", cfg, n_boot=50)
    assert s2["metrics"]["accuracy"]["after"] == s["metrics"]["accuracy"]["after"]
    n_after = sum(1 for line in (tmp_path / "run" / "after" / "records.jsonl").read_text().splitlines() if '"pred"' in line)
    assert n_after == 36 * 2  # 36 test items × 2 instructions, once


def test_a_half_precision_fit_says_its_neurons_may_differ_from_float32(tmp_path):
    """bf16 (the GPU default) may swap some of the few pruned neurons (experiments/crispr/bf16_attribution.md):
    the run's notes say so and how to reproduce a float32 fit."""
    from biaslab.models import LanguageModel

    model, tok = make_tiny_llama()
    lm = LanguageModel(model.to(torch.bfloat16), tok, spec="tiny-bf16", progress=False)
    cfg = C.CrisprConfig(neurons=2, instructions=1, dev_size=4, control_seeds=1, retention=False)
    s = _run(lm, _items(20), tmp_path / "run", cfg, n_boot=20)
    assert s["model"]["dtype"] == "bfloat16"
    assert any("attributed in bfloat16" in n and "--dtype float32 reproduces" in n for n in s["notes"])


def test_demo_preset_is_a_shipped_config_file(monkeypatch):
    from typer.testing import CliRunner

    import biaslab.evaluation.runner as runner
    from biaslab.cli import app
    from biaslab.evaluation.config import load_config

    seen = {}

    def fake_run(method, model, task, config, **kw):
        seen[task] = (config, kw)
        raise BiaslabError("stop here")
    monkeypatch.setattr(runner, "run_mitigation", fake_run)
    CliRunner().invoke(app, ["mitigate", "crispr", "--config", "demo", "--out", "/tmp/x"])
    d, kw = seen["sst2"]
    assert (d.protocol, d.instructions, d.search_max, d.search_dev_limit, kw["limit"]) == ("cloze", 3, 16, 60, 100)
    # command line > file > defaults
    CliRunner().invoke(app, ["mitigate", "crispr", "--config", "demo", "--task", "bbq:Age", "--protocol", "letter",
                             "--limit", "7", "--out", "/tmp/x"])
    d, kw = seen["bbq:Age"]
    assert (d.protocol, d.search, d.instructions, kw["limit"]) == ("letter", True, 3, 7)
    CliRunner().invoke(app, ["mitigate", "crispr", "--task", "sst2", "--neurons", "2", "--out", "/tmp/x"])
    assert seen["sst2"][0].protocol == "letter" and seen["sst2"][1]["limit"] is None  # no file: the defaults
    # Python users load the same preset
    fields, run = load_config(C.CrisprConfig, "demo", method_name="crispr")
    assert fields["protocol"] == "cloze" and run == {"task": "sst2", "limit": 100}


def test_random_control_never_draws_crisprs_units():
    sizes = {"a": 20}
    for seed in range(30):
        plain = C.random_units(sizes, {"a": 3}, seed)
        excl = C.random_units(sizes, {"a": 3}, seed, exclude={"a": [0, 1, 2, 3, 4]})
        assert len(excl["a"]) == 3 and not set(excl["a"]) & {0, 1, 2, 3, 4}
        if not set(plain["a"]) & {0, 1, 2, 3, 4}:
            assert excl == plain  # a draw that hits no excluded unit is unchanged
    with pytest.raises(BiaslabError, match="cannot draw 3 control units"):
        C.random_units({"a": 4}, {"a": 3}, 0, exclude={"a": [0, 1]})


def test_search_small_finds_a_peak_that_a_plateau_hides():
    """The SST-2 10-instruction failure: every large n gives the same constant answer, a one-record blip at n = 28
    steers golden-section search away, and the peak at n = 2 is never seen — unless 1..K are tried too."""
    def f(n):
        return {0: 0.63, 1: 0.675, 2: 0.625, 3: 0.597, 4: 0.598}.get(n, 0.5017 if n == 28 else 0.5)

    n0, s0 = C.choose_n(f, C.CrisprConfig(search=True, search_max=500))
    assert n0 == 0 and 1 not in s0 and 0 in s0            # what the released search does here
    n4, s4 = C.choose_n(f, C.CrisprConfig(search=True, search_max=500, search_small=4))
    assert n4 == 1 and {1, 2, 3, 4} <= set(s4)
    with pytest.raises(BiaslabError, match="--search-small"):
        C.CrisprConfig(search=True, search_small=-1).validate()


def test_full_loop_on_a_user_task_file_with_its_own_instructions(tiny_lm, tmp_path):
    """``--task mc:PATH``: a JSON Lines task of the user's own, posed under the header's instructions."""
    from typer.testing import CliRunner

    from biaslab.cli import app

    rows = [{"instructions": ["Is this review negative or positive?", "Say the sentiment of the review."]}]
    rows += [{"id": it.id, "context": it.context, "question": it.question, "options": list(it.options),
              "gold": it.options[it.gold], "group": it.meta["label"] and "pos" or "neg"} for it in _items(40)]
    task = tmp_path / "reviews.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    s = _run(tiny_lm, f"mc:{task}", tmp_path / "run", C.CrisprConfig(neurons=3, instructions=2, dev_size=4,
                                                                     control_seeds=1, retention=False), n_boot=20)
    assert s["task"].startswith("mc:reviews.jsonl@") and s["details"]["n_neurons"] == 3
    recs = [json.loads(line) for line in (tmp_path / "run" / "before" / "records.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "chunk_done" not in r]          # drop the resume markers
    assert {r["instruction"] for r in recs} == {0, 1} and {r["group"] for r in recs} == {"pos", "neg"}
    m = s["metrics"]
    assert {"accuracy", "accuracy[neg]", "accuracy[pos]", "group_accuracy_gap"} <= set(m)
    for side in ("before", "after"):
        assert m["group_accuracy_gap"][side] == pytest.approx(abs(m["accuracy[pos]"][side] - m["accuracy[neg]"][side]))
    # by hand, from the records: each group's accuracy is the mean over instructions of its share correct
    per_instr = [sum(r["correct"] for r in recs if r["group"] == "pos" and r["instruction"] == i)
                 / sum(r["group"] == "pos" and r["instruction"] == i for r in recs) for i in (0, 1)]
    assert m["accuracy[pos]"]["before"] == pytest.approx(sum(per_instr) / 2)
    # compare reloads the task from the manifest's task_spec (the file's absolute path), from any directory
    from biaslab.signoff.compare import compare_runs

    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["task_spec"] == f"mc:{task.resolve()}"
    cmp = compare_runs([tmp_path / "run", tmp_path / "run"], n_boot=10)
    got = {r["metric"]: r["values"][0]["value"] for r in cmp["rows"] if r["scope"] == "test"}
    assert got["accuracy[pos]"] == pytest.approx(m["accuracy[pos]"]["after"])
    with pytest.raises(BiaslabError, match="positive number of instructions"):
        C.CrisprConfig(neurons=3, instructions=0).validate()
    with pytest.raises(BiaslabError, match="more instructions than task custom has \\(10\\)"):
        C.check_task_items(_items(4), "custom", 11)              # the ten generic instructions
    with pytest.raises(BiaslabError, match="more instructions than task mc:reviews.jsonl@.* has \\(2\\)"):
        _run(tiny_lm, f"mc:{task}", tmp_path / "run3", C.CrisprConfig(neurons=3, instructions=3, retention=False))
    # the CLI names the offending line of a bad task file before loading any model
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"context": "c", "options": ["x", "y"], "gold": 5}) + "\n")
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--task", f"mc:{bad}", "--neurons", "1", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, BiaslabError) and f"{bad}, line 2: field 'gold'" in str(r.exception)


def test_cli_summary_prints_data_named_metrics_literally():
    """Group names come from the user's file: ``accuracy[neg]`` must not be read as rich markup (and vanish)."""
    from rich.console import Console

    from biaslab.evaluation.report import summary_tables

    con = Console(record=True, width=200)
    m = {"set": "test", "before": 0.5, "after": 0.6, "delta": 0.1, "delta_ci95": [0.0, 0.2], "std_before": 0.0,
         "std_after": 0.0}
    summary = {"method": "crispr", "task": "mc:[bold]x@abc", "evaluation": {"sets": {"test": {"n_items": 10}}},
               "metrics": {"accuracy[neg]": m, "accuracy[bold]": m}, "controls": {}, "retention": None}
    for t in summary_tables(summary, "2 neurons [red]pruned"):
        con.print(t)
    text = con.export_text()
    assert "accuracy[neg]" in text and "accuracy[bold]" in text and "mc:[bold]x@abc" in text and "[red]" in text


def test_calibration_decision_is_p_over_p_cf_by_hand(tiny_lm):
    """Golden: the calibrated label is argmax p(label | x) / p_cf(label) (Zhao et al., W = diag(p_cf)^-1), and the
    label-renormalised probabilities are p / p_cf normalised."""
    import math

    from biaslab.methods.calibration.patch import CalibrationPatch

    labels = [" positive", " negative"]
    ids = [tiny_lm.candidate_token_id(c) for c in labels]
    prompt = "Review: fine. Sentiment:"
    before = tiny_lm.next_token_logprobs([prompt], labels)[0]
    p_cf = [0.8, 0.2]
    patch = CalibrationPatch.from_probs(tiny_lm, ids, p_cf)
    with patch.applied(tiny_lm):
        after = tiny_lm.next_token_logprobs([prompt], labels)[0]
    want = [math.exp(b) / c for b, c in zip(before, p_cf)]
    want = [w / sum(want) for w in want]
    got = [math.exp(a) for a in after]
    got = [g / sum(got) for g in got]
    assert got == pytest.approx(want, rel=1e-4)
    assert patch.params["p_cf"] == pytest.approx([0.8, 0.2])


def test_crispr_baselines_are_validated():
    from biaslab.methods.crispr.config import CrisprConfig

    with pytest.raises(Exception, match="CRISPR baseline 'xx'"):
        CrisprConfig(neurons=1, baselines=("xx",)).validate()
    with pytest.raises(Exception, match="needs --protocol letter or cloze"):
        CrisprConfig(neurons=1, baselines=("cc",), protocol="option-loglik").validate()


def test_generation_protocol_is_the_released_codes_evaluation(tiny_lm, monkeypatch):
    """--protocol generation: greedy answers (≤ 16 tokens) matched exactly after stripping whitespace and periods
    and lower-casing; no match = wrong (kept in accuracy, left out of the bias scores); the dev search scores by
    generation too; attribution reads the options' log-likelihood (a named deviation in the patch)."""
    from biaslab.metrics import bbq as M
    from biaslab.tasks import prompt_text, score_mc

    items = _items(12)
    assert "Answer options: negative, positive" in prompt_text(tiny_lm, items[0], 0, protocol="generation")
    calls = []

    def fake_generate(prompts, **kw):
        calls.append((len(prompts), kw.get("max_new_tokens")))
        return [" Positive.\n" if k % 3 == 0 else ("negative" if k % 3 == 1 else "it is negative") for k in range(len(prompts))]
    monkeypatch.setattr(tiny_lm, "generate", fake_generate)
    recs = score_mc(tiny_lm, items[:3], [0], protocol="generation")
    assert [r["pred"] for r in recs] == [1, 0, None] and calls[-1] == (3, 16)
    assert recs[2]["no_match"] == "wrong" and recs[2]["correct"] == 0 and "no_match" not in recs[0]
    # in BBQ's metrics an unmatched answer under generation is an error, not dropped; the bias score ignores it
    bbq = [dict(r, context_condition="disambig", unknown=2, target=1) for r in recs]
    assert M.accuracy(bbq) == pytest.approx(sum(r["correct"] for r in bbq) / 3)
    assert M.bias_counts(bbq, condition="disambig") == (1, 2)
    assert M.accuracy([dict(bbq[2], no_match=None)] + bbq[:2]) == pytest.approx(sum(r["correct"] for r in bbq[:2]) / 2)
    calls.clear()
    res = C.fit_details(tiny_lm, _items(40), C.CrisprConfig(search=True, search_max=4, search_tol=2, instructions=1,
                                                            dev_size=4, protocol="generation"))
    assert calls, "the dev search must score by generation"
    dev = next(d for d in res.patch.params["deviations"] if "generation" in d)
    assert "exact match" in dev and "log-likelihood" in dev
