"""Integration: audit the real default model on a few items of the likelihood benchmarks."""
import pytest

from biaslab.auditing import audit

pytestmark = pytest.mark.integration


def test_audit_real_model_crows_stereoset_retention(real_lm):
    res = audit(real_lm, ["crows", "stereoset", "retention"], limit=8, n_boot=50)
    b = res.results["benchmarks"]
    assert b["crows"]["protocol"] == "crows.shared-tokens.v1"
    assert b["stereoset"]["protocol"] == "stereoset.intrasentence.mean-loglik.v1"
    assert all(b[n]["n_items"] == 8 for n in b)
    assert 0.0 <= res.metric("crows", "stereotype_score") <= 100.0
    assert b["crows"]["extra"]["n_pairs"] == 8
    for m in ("ss", "lms", "icat"):
        assert 0.0 <= res.metric("stereoset", m) <= 100.0
    assert set(b["stereoset"]["groups"]) == {"gender", "profession", "race", "religion"}
    # a 135M instruct model on WikiText-2: perplexity in the tens, not thousands (random would be ~50k)
    assert 5.0 < res.metric("retention", "perplexity") < 200.0
    assert 0.0 <= res.metric("retention", "knowledge_accuracy") <= 1.0
    assert b["retention"]["extra"]["wikitext_windows"] == 4 and b["retention"]["extra"]["knowledge_facts"] == 4
    lo, hi = b["retention"]["metrics"]["perplexity"]["ci95"]
    assert lo <= res.metric("retention", "perplexity") <= hi
    assert len(res.records["crows"]) == 8 and len(res.records["stereoset"]) == 8
