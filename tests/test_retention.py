"""Retention: hand-computed perplexity / knowledge accuracy, WikiText windows, loader errors, scoring."""
import json
import math

import pytest

from biaslab.auditing import summarize
from biaslab.benchmarks.retention import PROTOCOL, Retention, known_facts, wikitext_windows
from biaslab.errors import BiaslabError, DataError
from biaslab.metrics import retention as M

RECS = [{"id": "w1", "part": "wikitext", "nll": 2.0, "n_tokens": 1, "n_words": 1},
        {"id": "w2", "part": "wikitext", "nll": 4.0, "n_tokens": 3, "n_words": 2},
        {"id": "k1", "part": "knowledge", "correct": True}, {"id": "k2", "part": "knowledge", "correct": False},
        {"id": "k3", "part": "knowledge", "correct": True}, {"id": "k4", "part": "knowledge", "correct": True}]


def test_metrics_by_hand_and_parts_ignored():
    assert M.perplexity(RECS) == pytest.approx(math.exp(6 / 4))
    assert M.word_perplexity(RECS) == pytest.approx(math.exp(6 / 3))
    assert M.knowledge_accuracy(RECS) == pytest.approx(0.75)
    assert math.isnan(M.perplexity(RECS[2:])) and math.isnan(M.knowledge_accuracy(RECS[:2]))


def test_summary_groups_by_part_with_intervals():
    sec = summarize(Retention(), RECS, PROTOCOL, n_boot=100)
    assert sec["protocol"] == "retention.wikitext2-wordwin-ppl+known-greedy.v1"
    assert sec["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(1.5))
    lo, hi = sec["metrics"]["perplexity"]["ci95"]
    assert math.exp(4 / 3) - 1e-9 <= lo <= hi <= math.exp(2.0) + 1e-9   # resamples mix the two windows
    assert sec["groups"]["knowledge"]["metrics"]["perplexity"]["value"] is None
    assert sec["groups"]["wikitext"]["metrics"]["knowledge_accuracy"]["value"] is None
    assert sec["extra"]["knowledge_correct"] == 3 and sec["extra"]["wikitext_tokens"] == 4


def test_wikitext_windows_crlf_articles_and_context(tmp_path):
    p = tmp_path / "w.raw.txt"
    p.write_bytes(b" \r\n = A = \r\n \r\n w1 w2 w3 w4 \r\n = = Sub = = \r\n x1 \r\n = B = \r\n y1 \r\n")
    items = wikitext_windows(p, window_words=3, context_words=2)
    # article A: "=", "A", "=", "w1".."w4", "=", "=", "Sub", "=", "=", "x1" = 13 words -> 5 windows; B: 4 -> 2
    assert [i["id"] for i in items] == [f"wiki-00-00{k}" for k in range(5)] + ["wiki-01-000", "wiki-01-001"]
    assert items[0] == {"id": "wiki-00-000", "part": "wikitext", "context": "", "text": " = A =", "n_words": 3}
    assert items[1]["context"] == " A =" and items[1]["text"] == " \n \n w1 w2 w3"
    assert items[4]["text"] == " \n x1" and items[4]["n_words"] == 1
    assert "\r" not in "".join(i["text"] for i in items)
    assert (items[5]["context"], items[5]["text"]) == ("", " = B =")
    assert (items[6]["context"], items[6]["text"]) == (" B =", " \n y1")
    p.write_bytes(b"stray text\r\n = A = \r\n")
    with pytest.raises(DataError) as e:
        wikitext_windows(p)
    assert e.value.line == 1


def test_known_facts_errors_name_the_line(tmp_path):
    p = tmp_path / "known.json"
    good = {"known_id": 0, "subject": "S", "attribute": "Paris", "template": "{} is in", "prompt": "S is in",
            "relation_id": "P1"}
    p.write_text(json.dumps([good, {**good, "known_id": 1, "attribute": ""}], indent=2))
    with pytest.raises(DataError) as e:
        known_facts(p)
    assert e.value.field == "attribute" and e.value.line == 10   # 2nd object opens on line 10
    p.write_text(json.dumps([good, good], indent=2))
    with pytest.raises(DataError, match="duplicate"):
        known_facts(p)
    p.write_text(json.dumps([good], indent=2))
    assert known_facts(p) == [{"id": "known-0000", "part": "knowledge", "prompt": "S is in", "attribute": "Paris",
                               "relation": "P1"}]
    with pytest.raises(BiaslabError, match="window_words"):
        Retention(window_words=0)


def test_vendored_data_and_balanced_limit():
    b = Retention()
    items = b.load_items()
    assert sum(i["part"] == "knowledge" for i in items) == 1209
    assert sum(i["part"] == "wikitext" for i in items) > 1500
    assert len({i["id"] for i in items}) == len(items)
    s = b.sample(items, 20, seed=0)
    assert sum(i["part"] == "wikitext" for i in s) == 10


def test_scoring_on_tiny_model(tiny_lm):
    b = Retention(window_words=16, context_words=8)
    items = b.sample(b.load_items(), 6, seed=0)
    recs = b.score(tiny_lm, items, protocol=PROTOCOL)
    assert recs == b.score(tiny_lm, items, protocol=PROTOCOL)
    assert [r["id"] for r in recs] == [i["id"] for i in items]
    for r, it in zip(recs, items):
        if it["part"] == "wikitext":
            s = tiny_lm.loglikelihood([(it["context"], it["text"])])[0]
            assert r["nll"] == pytest.approx(-s.logprob, rel=1e-4) and r["n_tokens"] == s.n_tokens > 0
        else:
            s = tiny_lm.loglikelihood([(it["prompt"], " " + it["attribute"])])[0]
            assert r["correct"] is s.greedy and r["relation"].startswith("P")
    assert M.perplexity(recs) > 1.0
