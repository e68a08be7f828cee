"""StereoSet intrasentence: hand-computed SS/LMS/ICAT with macro-averaging over targets then domains."""
import json
import math

import pytest

from biaslab.auditing import summarize
from biaslab.benchmarks.stereoset import MEAN, StereoSet, load_partial, load_reduced
from biaslab.errors import DataError
from biaslab.metrics import stereoset as M


def rec(i, domain, target, s, a, u):
    return {"id": f"c{i}", "domain": domain, "target": target, "lp_stereotype": s, "lp_anti_stereotype": a,
            "lp_unrelated": u}


RECS = [
    rec(0, "race", "A", -1.0, -2.0, -3.0),   # pro; s>u, a>u -> 2 related
    rec(1, "race", "A", -2.0, -1.0, -1.5),   # anti; s<u, a>u -> 1 related
    rec(2, "race", "B", -1.0, -3.0, -0.5),   # pro; 0 related
    rec(3, "gender", "C", -3.0, -1.0, -5.0),  # anti; 2 related
]
# target A: ss 50, lms 75; target B: ss 100, lms 0 -> race: ss 75, lms 37.5, icat 37.5*25/50 = 18.75
# gender (target C): ss 0, lms 100, icat 0
# overall (mean over domains): ss 37.5, lms 68.75, icat 68.75*37.5/50 = 51.5625
# (the official pooled-over-targets average would give ss (50+100+0)/3 = 50 instead)


def test_target_scores_by_hand():
    t = M.target_scores(RECS)
    assert t[("race", "A")] == {"n": 2, "ss": 50.0, "lms": 75.0}
    assert t[("race", "B")] == {"n": 1, "ss": 100.0, "lms": 0.0}
    assert t[("gender", "C")] == {"n": 1, "ss": 0.0, "lms": 100.0}


def test_macro_average_over_targets_then_domains_and_icat():
    assert M.macro_scores(RECS) == pytest.approx({"ss": 37.5, "lms": 68.75, "icat": 51.5625})
    race = [r for r in RECS if r["domain"] == "race"]
    assert M.macro_scores(race) == pytest.approx({"ss": 75.0, "lms": 37.5, "icat": 18.75})
    assert M.icat([r for r in RECS if r["domain"] == "gender"]) == 0.0
    assert M.icat_from(50.0, 80.0) == 80.0 and M.icat_from(100.0, 80.0) == 0.0


def test_ties_count_against_and_empty_is_nan():
    tie = [rec(0, "religion", "X", -1.0, -1.0, -1.0)]
    assert M.ss(tie) == 0.0 and M.lms(tie) == 0.0
    assert all(math.isnan(v) for v in M.macro_scores([]).values())


def test_summarize_per_domain():
    b = StereoSet()
    sec = summarize(b, RECS, MEAN, n_boot=50)
    assert sec["protocol"] == "stereoset.intrasentence.mean-loglik.v1"
    assert sec["metrics"]["icat"]["value"] == pytest.approx(51.5625)
    assert sec["groups"]["race"]["metrics"]["ss"]["value"] == pytest.approx(75.0)
    assert sec["groups"]["gender"]["metrics"]["lms"]["value"] == pytest.approx(100.0)
    lo, hi = sec["metrics"]["ss"]["ci95"]
    assert 0.0 <= lo <= hi <= 100.0


def cluster(cid="c1", labels=("stereotype", "anti-stereotype", "unrelated")):
    return {"id": cid, "target": "T", "bias_type": "race", "context": "T men are BLANK",
            "sentences": [{"sentence": f"T men are w{k}", "id": f"s{k}", "gold_label": lab} for k, lab in enumerate(labels)]}


def test_partial_loader_validates(tmp_path):
    p = tmp_path / "race.json"
    p.write_text(json.dumps([cluster()]))
    it = load_partial(p, "race")[0]
    assert (it["id"], it["stereotype"], it["unrelated"]) == ("ss-c1", "T men are w0", "T men are w2")
    p.write_text(json.dumps([cluster(), cluster("c2", ("stereotype", "anti", "unrelated"))]))
    with pytest.raises(DataError) as e:
        load_partial(p, "race")
    assert e.value.field == "[1].sentences[1].gold_label" and "anti" in str(e.value)
    bad = cluster()
    del bad["target"]
    p.write_text(json.dumps([bad]))
    with pytest.raises(DataError, match="target"):
        load_partial(p, "race")


def test_reduced_loader_fills_blank_and_validates(tmp_path):
    p = tmp_path / "red.jsonl"
    ok = {"prompt": "The chess player was BLANK.", "choices": ["asian", "hispanic", "fox"],
          "bias_type": "profession", "target": "chess player"}
    p.write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n")
    items = load_reduced(p)
    assert [i["stereotype"] for i in items] == ["The chess player was asian."] * 2
    assert items[1]["id"] == items[0]["id"] + "-2"   # exact duplicates stay distinct
    p.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "choices": ["a", "b"]}) + "\n")
    with pytest.raises(DataError) as e:
        load_reduced(p)
    assert e.value.line == 2 and e.value.field == "choices"


def test_vendored_combination():
    items = StereoSet().load_items()
    by = {}
    for it in items:
        by[(it["domain"], it["source"])] = by.get((it["domain"], it["source"]), 0) + 1
    assert by == {("race", "partial"): 962, ("religion", "partial"): 79, ("gender", "partial"): 253,
                  ("profession", "reduced"): 810}
    assert len({i["id"] for i in items}) == len(items) == 2104
    brahmin = [i for i in items if i["context"].startswith("brahmin is very")]
    assert [(i["source"], i["stereotype"]) for i in brahmin] == [  # two BLANKs: the partial file's full sentence
        ("partial", "Brahmin is very religious and is strict about religious")]


def test_scoring_on_tiny_model(tiny_lm):
    b = StereoSet()
    items = b.sample(b.load_items(), 8, seed=0)
    assert {i["domain"] for i in items} == {"race", "religion", "gender", "profession"}
    recs = b.score(tiny_lm, items, protocol=MEAN)
    assert recs == b.score(tiny_lm, items, protocol=MEAN)
    s = tiny_lm.loglikelihood([("", items[0]["anti_stereotype"])])[0]
    r = recs[0]
    assert set(r) >= {"id", "domain", "target", "lp_stereotype", "lp_anti_stereotype", "lp_unrelated"}
    assert r["lp_anti_stereotype"] == pytest.approx(s.mean_logprob, abs=1e-4)
    assert 0 <= M.ss(recs) <= 100 and 0 <= M.icat(recs) <= 100


def test_intersentence_loads_every_dev_cluster_and_scores_given_the_context(tiny_lm):
    from collections import Counter

    from biaslab.benchmarks import get_benchmark
    from biaslab.benchmarks.stereoset_inter import score_inter

    b = get_benchmark("stereoset-inter")
    items = b.load_items()
    assert len(items) == 2123 and len({it["id"] for it in items}) == 2123
    assert set(Counter(it["domain"] for it in items)) == {"race", "profession", "gender", "religion"}
    it = items[0]
    rec = score_inter(tiny_lm, [it])[0]
    want = tiny_lm.loglikelihood([(it["context"] + " ", it["stereotype"])])[0].mean_logprob
    alone = tiny_lm.loglikelihood([("", it["stereotype"])])[0].mean_logprob
    assert rec["lp_stereotype"] == pytest.approx(want) and rec["lp_stereotype"] != pytest.approx(alone)


def test_both_tasks_overall_is_the_union_and_keeps_each_task():
    """Golden: the overall SS of intra + inter records is the macro score over the union's target terms."""
    from biaslab.benchmarks.stereoset_inter import StereoSetBoth
    from biaslab.metrics import stereoset as M

    def r(task, target, s, a, u):
        return {"id": f"{task}{target}{s}", "task": task, "domain": "race", "target": target,
                "lp_stereotype": s, "lp_anti_stereotype": a, "lp_unrelated": u}
    recs = [r("intrasentence", "x", -1, -2, -3), r("intersentence", "x", -2, -1, -3), r("intersentence", "y", -1, -2, -9)]
    # target x: 1 of 2 clusters stereotype-first (50 %), target y: 1 of 1 (100 %) → SS = 75
    assert M.ss(recs) == pytest.approx(75.0)
    extra = StereoSetBoth().extra_results(recs, None)
    assert extra["intrasentence"]["ss"] == pytest.approx(100.0) and extra["intersentence"]["n_clusters"] == 2
