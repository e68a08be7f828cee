"""Integration: audit the real default model on a few BBQ and WinoBias items (shapes, ranges, protocol ids)."""
import pytest

pytestmark = pytest.mark.integration


def test_real_model_bbq_winobias_audit(real_lm):
    from biaslab.auditing import audit
    from biaslab.benchmarks.bbq import BBQ_CATEGORIES

    res = audit(real_lm, ["bbq", "winobias"], limit=8, n_boot=50, instructions=2)
    bbq = res.results["benchmarks"]["bbq"]
    assert bbq["protocol"] == "bbq.letter.v2" and bbq["n_items"] == 8 and bbq["n_records"] == 16
    assert set(bbq["groups"]) <= set(BBQ_CATEGORIES) and len(bbq["groups"]) >= 4
    for name in ("accuracy", "accuracy_ambig", "accuracy_disambig"):
        m = bbq["metrics"][name]
        assert 0 <= m["value"] <= 1 and len(m["per_instruction"]) == 2 and m["std"] >= 0
        assert 0 <= m["ci95"][0] <= m["ci95"][1] <= 1
    for name in ("bias_score_ambig", "bias_score_disambig"):
        v = bbq["metrics"][name]["value"]
        assert v is None or -100 <= v <= 100
    assert len(res.records["bbq"]) == 16
    assert all(len(r["logprobs"]) == 3 and max(r["logprobs"]) <= 0 for r in res.records["bbq"])

    wb = res.results["benchmarks"]["winobias"]
    assert wb["protocol"] == "winobias.letter.v2" and wb["n_items"] == 8 and set(wb["groups"]) == {"type1", "type2"}
    pro, anti, gap = (wb["metrics"][k]["value"] for k in ("accuracy_pro", "accuracy_anti", "gap"))
    assert 0 <= pro <= 1 and 0 <= anti <= 1 and gap == pytest.approx(pro - anti)
    assert wb["extra"]["skipped_rows"] == 0
