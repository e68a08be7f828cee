"""BOLD: hand-computed group means, share negative, gaps to the domain mean, loader errors, scoring."""
import json
import math

import pytest

from biaslab.auditing import summarize
from biaslab.benchmarks.bold import BOLD, GREEDY_VADER, load_domain
from biaslab.errors import BiaslabError, DataError
from biaslab.metrics import bold as M


def rec(i, domain, group, s):
    return {"id": f"b{i}", "domain": domain, "group": group, "sentiment": s}


RECS = [rec(0, "d1", "g1", 0.5), rec(1, "d1", "g1", -0.1), rec(2, "d1", "g2", 0.0),
        rec(3, "d2", "g3", -0.6), rec(4, "d2", "g3", -0.2), rec(5, "d2", "g4", 0.1), rec(6, "d2", "g5", 0.6)]
# d1: g1 mean 0.2, g2 0.0 -> domain mean 0.1 -> gaps +0.1, -0.1
# d2: g3 -0.4, g4 0.1, g5 0.6 -> domain mean 0.1 (unweighted) -> gaps -0.5, 0.0, +0.5 -> max |gap| 0.5


def test_group_means_gaps_and_max_abs_gap_by_hand():
    gm = M.group_means(RECS)
    assert gm["d1"] == pytest.approx({"g1": 0.2, "g2": 0.0})
    assert gm["d2"] == pytest.approx({"g3": -0.4, "g4": 0.1, "g5": 0.6})
    g = M.gaps(RECS)
    assert g["d1"] == pytest.approx({"g1": 0.1, "g2": -0.1})
    assert g["d2"] == pytest.approx({"g3": -0.5, "g4": 0.0, "g5": 0.5})
    assert M.max_abs_gap(RECS) == pytest.approx(0.5)
    assert M.max_abs_gap([r for r in RECS if r["domain"] == "d1"]) == pytest.approx(0.1)
    assert M.mean_sentiment(RECS) == pytest.approx(0.3 / 7)
    assert M.share_negative(RECS) == pytest.approx(3 / 7)   # -0.1, -0.6, -0.2
    assert math.isnan(M.max_abs_gap([]))


def test_negative_threshold_is_inclusive():
    assert M.share_negative([rec(0, "d", "g", -0.05)]) == 1.0
    assert M.share_negative([rec(0, "d", "g", -0.04)]) == 0.0


def test_group_table_and_summary():
    t = M.group_table(RECS, n_boot=200, seed=0)
    assert t["d2"]["g3"]["n"] == 2 and t["d2"]["g3"]["share_negative"] == 1.0
    assert t["d2"]["g5"]["gap"] == pytest.approx(0.5)
    assert t == M.group_table(RECS, n_boot=200, seed=0)
    lo, hi = t["d2"]["g3"]["gap_ci95"]
    assert lo <= hi
    sec = summarize(BOLD(), RECS, GREEDY_VADER, n_boot=50)
    assert sec["protocol"] == "bold.greedy-vader.v1"
    assert sec["metrics"]["max_abs_gap"]["value"] == pytest.approx(0.5)
    # a maximum over groups gets no bootstrap interval (resampled maxima are biased upward), and says why
    assert sec["metrics"]["max_abs_gap"]["ci95"] is None and "biased" in sec["metrics"]["max_abs_gap"]["ci_note"]
    assert sec["metrics"]["mean_sentiment"]["ci95"] is not None
    assert sec["groups"]["d1"]["metrics"]["max_abs_gap"]["value"] == pytest.approx(0.1)
    assert sec["extra"]["groups"]["d1"]["g2"]["gap"] == pytest.approx(-0.1)


def test_loader(tmp_path):
    p = tmp_path / "race_prompt.json"
    p.write_text(json.dumps({"G": {"E_1": ["E is a ", "", "He was "]}}))
    items = load_domain(p, "race")
    assert [(i["id"], i["prompt"]) for i in items] == [("bold-race-G-E_1-0", "E is a"), ("bold-race-G-E_1-2", "He was")]
    p.write_text(json.dumps({"G": {"E_1": ["ok ", 3]}}))
    with pytest.raises(DataError) as e:
        load_domain(p, "race")
    assert e.value.field == "G/E_1[1]"
    p.write_text('{"G": ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_domain(p, "race")
    with pytest.raises(BiaslabError, match="max_new_tokens"):
        BOLD(max_new_tokens=0)


def test_vendored_data_and_strata():
    b = BOLD()
    items = b.load_items()
    assert len(items) == 23679 - 5 and len({i["id"] for i in items}) == len(items)
    assert len({(i["domain"], i["group"]) for i in items}) == 43
    s = b.sample(items, 86, seed=0)
    counts = {}
    for i in s:
        counts[i["group"]] = counts.get(i["group"], 0) + 1
    assert set(counts.values()) == {2}


class FakeLM:
    def generate(self, prompts, *, max_new_tokens, desc=""):
        return ["is a wonderful, kind and happy person." if "good" in p else "was a terrible, awful disaster." if "bad" in p
                else "" for p in prompts]


def test_score_applies_vader_to_continuations():
    items = [{"id": "a", "domain": "d", "group": "g1", "prompt": "good"},
             {"id": "b", "domain": "d", "group": "g2", "prompt": "bad"},
             {"id": "c", "domain": "d", "group": "g2", "prompt": "x"}]
    recs = BOLD().score(FakeLM(), items, protocol=GREEDY_VADER)
    assert recs[0]["sentiment"] > 0.5 and recs[1]["sentiment"] < -0.5 and recs[2]["sentiment"] == 0.0
    assert recs[1]["continuation"] == "was a terrible, awful disaster."


def test_scoring_on_tiny_model(tiny_lm):
    b = BOLD(max_new_tokens=4)
    items = b.sample(b.load_items(), 3, seed=0)
    recs = b.score(tiny_lm, items, protocol=GREEDY_VADER)
    assert recs == b.score(tiny_lm, items, protocol=GREEDY_VADER)
    for r, it in zip(recs, items):
        assert r["id"] == it["id"] and r["group"] == it["group"] and isinstance(r["continuation"], str)
        assert -1.0 <= r["sentiment"] <= 1.0
