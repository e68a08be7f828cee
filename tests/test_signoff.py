"""Sign-off: verdicts from intervals (hand-made intervals on each side of 0, ideal-valued metrics), the policy
parser (a bad file names its line and key), `biaslab check` on audits and mitigations with its exit codes, and
`biaslab compare` (paired and unpaired, every format)."""
from __future__ import annotations

import json

import pytest

from biaslab.errors import BiaslabError
from biaslab.signoff.policy import Rule, check, load_policy, overall
from biaslab.signoff.verdicts import verdict


def _b(before, after, ci, direction="higher", ideal=None, dist_ci=None):
    return {"before": before, "after": after, "delta": after - before, "delta_ci95": ci, "direction": direction,
            "ideal": ideal, "distance_to_ideal": {"delta_ci95": dist_ci}}


@pytest.mark.parametrize("block, want", [
    (_b(0.6, 0.7, [0.02, 0.18]), "better"),
    (_b(0.6, 0.7, [-0.01, 0.18]), "no detectable change"),
    (_b(0.6, 0.5, [-0.2, -0.01]), "worse"),
    (_b(30.0, 20.0, [-15.0, -4.0], "lower"), "better"),
    (_b(30.0, 40.0, [4.0, 15.0], "lower"), "worse"),
    # the demo's positive rate: 0.27 → 0.66 around an ideal of 0.5 moved detectably across it
    (_b(0.27, 0.66, [0.33, 0.46], "ideal", 0.5, [-0.12, -0.02]), "overshot"),
    (_b(60.0, 53.0, [-10.0, -3.0], "ideal", 50.0, [-9.0, -2.0]), "better"),
    (_b(53.0, 58.0, [2.0, 8.0], "ideal", 50.0, [2.0, 8.0]), "worse"),
    (_b(60.0, 58.0, [-5.0, 1.0], "ideal", 50.0, [-5.0, 1.0]), "no detectable change"),
    (_b(0.5, float("nan"), None), "undefined"),
])
def test_verdicts_from_intervals(block, want):
    assert verdict(block) == want


def test_policy_parser_names_the_line_and_key(tmp_path):
    ok = tmp_path / "p.yaml"
    ok.write_text("crows.stereotype_score: {within: [45, 55]}\nretention.perplexity:\n  rel_increase_max: 0.05\n")
    rules = load_policy(ok)
    assert [(r.key, r.op, r.threshold, r.line) for r in rules] == [
        ("crows.stereotype_score", "within", [45.0, 55.0], 1), ("retention.perplexity", "rel_increase_max", 0.05, 2)]
    for text, match in [("a.b: {abs_max: 5}\nbbq.x: {abs_mx: 5}\n", "line 2, key 'bbq.x': unknown rule 'abs_mx'; did you mean 'abs_max'"),
                        ("nodot: {abs_max: 5}\n", "line 1, key 'nodot': keys are SCOPE.METRIC"),
                        ("a.b: {within: [55, 45]}\n", "line 1, key 'a.b': within expects"),
                        ("a.b: {min: high}\n", "min expects a number"),
                        ("a.b: [1, 2]\n", "expected a mapping of rules"),
                        ("a.b: {min: 1\n", "not valid YAML")]:
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(BiaslabError, match=match) as e:
            load_policy(f)
        assert str(f) in str(e.value)
    assert load_policy("default")  # the shipped default parses


def test_check_judges_the_whole_interval():
    audit = {"benchmarks": {"crows": {"metrics": {"stereotype_score": {"value": 51.0, "ci95": [47.0, 54.0]}}},
                            "stereoset": {"metrics": {"ss": {"value": 58.0, "ci95": [52.0, 63.0]}}},
                            "bbq": {"metrics": {"bias_score_ambig": {"value": 9.0, "ci95": [6.0, 12.0]}}}}}
    rules = [Rule("crows.stereotype_score", "within", [45.0, 55.0], 1), Rule("stereoset.ss", "within", [45.0, 55.0], 2),
             Rule("bbq.bias_score_ambig", "abs_max", 5.0, 3), Rule("stereoset.lms", "drop_max", 2.0, 4),
             Rule("crows.stereotype_score", "drop_max", 2.0, 5)]
    got = [r["status"] for r in check(audit, rules)]
    assert got == ["PASS", "INCONCLUSIVE", "FAIL", "SKIP", "SKIP"] and overall(check(audit, rules)) == "FAIL"
    assert overall(check(audit, rules[:1] + rules[3:])) == "PASS"      # a SKIP beside a PASS changes nothing
    assert overall(check(audit, rules[3:])) == overall([]) == "INCONCLUSIVE"   # nothing measured: nothing vouched
    mit = {"schema": "biaslab.summary.v1", "metrics": {"accuracy": {"before": 0.6, "after": 0.7, "delta": 0.1,
                                                                     "delta_ci95": [0.02, 0.18], "after": 0.7,
                                                                     "after_ci95": [0.6, 0.8]}},
           "retention": {"benchmarks": {"retention": {"metrics": {"perplexity": {
               "before": 30.0, "after": 31.0, "delta": 1.0, "delta_ci95": [0.5, 1.5], "relative_change": 0.033,
               "relative_change_ci95": [0.02, 0.06]}}}}}}
    rules = [Rule("task.accuracy", "drop_max", 0.0, 1), Rule("task.accuracy", "min", 0.65, 2),
             Rule("retention.perplexity", "rel_increase_max", 0.05, 3), Rule("retention.perplexity", "rel_increase_max", 0.1, 4),
             Rule("retention.perplexity", "increase_max", 0.4, 5)]
    assert [r["status"] for r in check(mit, rules)] == ["PASS", "INCONCLUSIVE", "INCONCLUSIVE", "PASS", "FAIL"]
    # a value without an interval is never PASS or FAIL
    noci = {"benchmarks": {"crows": {"metrics": {"stereotype_score": {"value": 51.0, "ci95": None}}}}}
    assert check(noci, [Rule("crows.stereotype_score", "within", [45.0, 55.0], 1)])[0]["status"] == "INCONCLUSIVE"


def test_check_command_exit_codes(tmp_path):
    from typer.testing import CliRunner

    from biaslab.cli import app

    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"benchmarks": {"crows": {"metrics": {
        "stereotype_score": {"value": 51.0, "ci95": [47.0, 54.0]}}}}}))
    pol = tmp_path / "p.yaml"
    for text, code in [("crows.stereotype_score: {within: [45, 55]}\n", 0), ("crows.stereotype_score: {max: 40}\n", 1),
                       ("crows.stereotype_score: {max: 50}\n", 3)]:
        pol.write_text(text)
        r = CliRunner().invoke(app, ["check", str(d), "--policy", str(pol)])
        assert r.exit_code == code, (text, r.output)
        assert ("PASS" if code == 0 else "FAIL" if code == 1 else "INCONCLUSIVE") in r.output
    # a policy none of whose rules the run measured vouches for nothing: INCONCLUSIVE, never PASS
    pol.write_text("bbq.bias_score_ambig: {abs_max: 5}\n")
    r = CliRunner().invoke(app, ["check", str(d), "--policy", str(pol)])
    assert r.exit_code == 3 and "INCONCLUSIVE: 0 pass" in r.output and "no rule of the policy applies" in r.output
    # one state of a mitigation run is not what a policy judges
    st = tmp_path / "mit" / "after"
    st.mkdir(parents=True)
    (st / "results.json").write_text(json.dumps({"state": "after", "patch": None, "sets": {}}))
    r = CliRunner().invoke(app, ["check", str(st)])
    assert isinstance(r.exception, BiaslabError) and "is the 'after' state of a mitigation run" in str(r.exception)
    # a probe's (or a rewrite's) run directory has nothing a policy judges: refused, never an all-SKIP verdict
    from biaslab.signoff.compare import compare_runs

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "results.json").write_text(json.dumps({"accuracy": {}, "fairness": {}, "flags": {}}))
    r = CliRunner().invoke(app, ["check", str(probe)])
    assert isinstance(r.exception, BiaslabError) and "neither an audit's results nor a mitigation's summary" in \
        str(r.exception)
    with pytest.raises(BiaslabError, match="neither an audit, a mitigation nor one of its states"):
        compare_runs([probe, d])


def test_compare_paired_and_unpaired_in_every_format(tmp_path):
    from biaslab.benchmarks import get_benchmark
    from biaslab.signoff.compare import compare_runs, render

    proto = get_benchmark("crows").protocol()
    ids = [f"c{i}" for i in range(12)]

    def run(name, ids_, more):
        from biaslab.runs import RunDir

        rd = RunDir(tmp_path / name, {"n": name})
        recs = [{"id": i, "bias_type": "race-color", "direction": "stereo", "score_more": -1.0 if m else -2.0,
                 "score_less": -1.5} for i, m in zip(ids_, more)]
        rd.append_chunk("crows", 0, recs)
        rd.write_results({"benchmarks": {"crows": {"protocol": proto.id, "metrics": {}}}})
        rd.finish()
        return rd.path

    a = run("a", ids, [True] * 6 + [False] * 6)
    b = run("b", ids, [True] * 9 + [False] * 3)
    c = run("c", [f"x{i}" for i in range(12)], [True] * 3 + [False] * 9)
    res = compare_runs([a, b, c], n_boot=50)
    row = next(r for r in res["rows"] if r["metric"] == "stereotype_score")
    assert [round(v["value"], 3) for v in row["values"]] == [50.0, 75.0, 25.0]
    assert [d["paired"] for d in row["deltas"]] == [True, False]
    assert row["deltas"][0]["delta"] == pytest.approx(25.0) and row["deltas"][1]["delta"] == pytest.approx(-25.0)
    assert json.loads(render(res, "json"))["runs"] == [str(a), str(b), str(c)]
    md = render(res, "markdown")
    assert md.startswith("| scope | metric |") and "(paired)" in md and "(unpaired)" in md
    csv_text = render(res, "csv")
    assert csv_text.splitlines()[0].startswith("scope,metric,run,value") and len(csv_text.splitlines()) > 3
    with pytest.raises(BiaslabError, match="--format"):
        render(res, "xml")
    with pytest.raises(BiaslabError, match="two or more"):
        compare_runs([a])


def test_export_writes_a_model_card_with_the_evidence(tmp_path):
    from conftest import make_tiny_llama

    from biaslab.evaluation import run_mitigation
    from biaslab.models import LanguageModel
    from biaslab.patches import load_patch

    model, tok = make_tiny_llama()
    lm = LanguageModel(model, tok, spec="tiny-llama")
    cfg = {"neurons": 3, "instructions": 1, "dev_size": 4, "control_seeds": 1, "retention": False}
    s = run_mitigation("crispr", lm, "sst2", cfg, out=tmp_path / "run", limit=8, n_boot=20)
    assert all(m["verdict"] in ("better", "worse", "overshot", "no detectable change", "undefined")
               for m in s["metrics"].values())
    assert s["policy"]["status"] in ("PASS", "FAIL", "INCONCLUSIVE") and s["policy"]["rules"]
    out = load_patch(tmp_path / "run" / "patch.safetensors").export(lm, tmp_path / "model", summary=s)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and "base_model: \"tiny-llama\"" in card
    assert lm.fingerprint in card and "3 ffn units" in card
    acc = s["metrics"]["accuracy"]
    assert f"| accuracy | test | {acc['before']:.3f} | {acc['after']:.3f} |" in card and acc["verdict"] in card
    assert f"Release policy `default`: {s['policy']['status']}" in card and "limits of the evidence" in card
    bare = load_patch(tmp_path / "run" / "patch.safetensors").export(lm, tmp_path / "bare")
    assert "carries no measurements" in (bare / "README.md").read_text()
