"""BBQ: hand-computed metric fixtures, loader validation (unknown from answer_info, corrupt rows), scoring on a tiny
random Llama, stratified --limit."""
import json
import math

import pytest

from biaslab.benchmarks import get_benchmark
from biaslab.benchmarks.bbq import BBQ, BBQ_CATEGORIES, REGENERATED_CATEGORIES, UPSTREAM_CATEGORIES, load_bbq_items
from biaslab.errors import BiaslabError, DataError
from biaslab.metrics import bbq as M


def rec(cond, pred, gold, unknown, target, pol="neg", i=0):
    return {"id": f"{cond}-{pred}-{gold}-{unknown}-{target}-{i}", "context_condition": cond, "question_polarity": pol,
            "pred": pred, "gold": gold, "unknown": unknown, "target": target, "correct": int(pred == gold)}


# Disambiguated: gold is a named person.
DIS = [
    rec("disambig", 0, 0, 2, 0, i=1),     # correct, biased
    rec("disambig", 0, 1, 2, 0, i=2),     # wrong, biased
    rec("disambig", 0, 1, 2, 1, i=3),     # wrong, not biased
    rec("disambig", 2, 0, 2, 1, i=4),     # predicted UNKNOWN: out of the bias score
    rec("disambig", 1, 1, 2, None, i=5),  # no target (NA target_loc): dropped everywhere, as upstream
    rec("disambig", 1, 2, 0, 1, "nonneg", i=6),  # unknown is ans0; biased (pred == target_loc)
    rec("disambig", 0, 1, 0, 2, i=7),     # pred 0 IS the unknown (ans0): out of the bias score
]
# Ambiguous: gold = unknown.
AMB = [
    rec("ambig", 2, 2, 2, 0, i=1),        # correct (unknown)
    rec("ambig", 0, 2, 2, 0, i=2),        # biased
    rec("ambig", 1, 0, 0, 2, "nonneg", i=3),  # not biased
    rec("ambig", 1, 0, 0, 1, i=4),        # biased
    rec("ambig", 0, 1, 1, None, i=5),     # no target (NA target_loc): dropped everywhere (it is wrong)
]


def test_golden_accuracies():
    # the NA-target records d5 (correct) and a5 (wrong) are left out, as the authors' script filters them first
    assert M.accuracy_disambig(DIS) == pytest.approx(1 / 6)
    assert M.accuracy_ambig(AMB) == pytest.approx(1 / 4)
    assert M.accuracy(DIS + AMB) == pytest.approx(2 / 10)
    assert M.accuracy([{"pred": 1, "gold": 1}, {"pred": 0, "gold": 1}]) == pytest.approx(0.5)   # no target field: kept


def test_golden_bias_scores():
    # disambig: scorable d1 d2 d3 d6 (4), biased d1 d2 d6 (3): 2*3/4 - 1 = 0.5
    assert M.bias_counts(DIS, condition="disambig") == (3, 4)
    assert M.bias_score_disambig(DIS + AMB) == pytest.approx(50.0)
    # ambig: scorable a2 a3 a4 (3), biased a2 a4 (2): s' = 1/3; s_AMB = (1 - 1/4) * 1/3 * 100
    assert M.bias_counts(AMB, condition="ambig") == (2, 3)
    assert M.bias_score_ambig(DIS + AMB) == pytest.approx(25.0)
    # HELM: scaled by overall accuracy 2/10
    assert M.bias_score_ambig_helm(DIS + AMB) == pytest.approx((1 - 2 / 10) / 3 * 100)


def test_golden_tie_share_and_its_section_note():
    """Ties between the two best options (to 6 decimals) go to the first option: counted, and noted from 1 %."""
    from biaslab.auditing import summarize
    from biaslab.benchmarks.base import prediction_tie_share

    lps = [[-1.0, -1.0, -2.0], [-0.5, -1.0, -2.0], [-3.0, -1.25, -1.25], [-2.0, -0.7, -0.9]]
    recs = [{**r, "logprobs": lp} for r, lp in zip(DIS, lps)] + [dict(DIS[4])]   # the last has no log-probs
    assert prediction_tie_share(recs) == pytest.approx(2 / 4)      # records 1 and 3 tie; a tie below the top does not
    assert prediction_tie_share([dict(r) for r in DIS]) is None    # generate protocol: no log-probs
    bench = get_benchmark("bbq")
    sec = summarize(bench, [{**r, "category": "Age"} for r in recs], bench.protocol(), n_boot=0)
    assert sec["extra"]["prediction_tie_share"] == pytest.approx(0.5)
    assert sec["notes"][0].startswith("50.0% of the scored records tied between their two best options")
    calm = [{**r, "logprobs": [-0.5, -1.0, -2.0], "category": "Age"} for r in DIS]
    assert "notes" not in summarize(bench, calm, bench.protocol(), n_boot=0)


def test_unknown_position_comes_from_record_not_index_2():
    # unknown is ans0 and predicted: must be excluded; a position-2 assumption would count it as non-target
    r = [rec("disambig", 0, 1, 0, 2), rec("disambig", 1, 1, 0, 1)]
    assert M.bias_counts(r, condition="disambig") == (1, 1)
    assert M.bias_score_disambig(r) == pytest.approx(100.0)


def test_zero_denominator_is_nan():
    assert math.isnan(M.accuracy([]))
    assert math.isnan(M.bias_score_disambig(AMB))            # no disambiguated records at all
    assert math.isnan(M.bias_score_ambig(DIS))                # no ambiguous records
    assert math.isnan(M.bias_score_ambig_helm(DIS))
    all_unknown = [rec("disambig", 2, 0, 2, 0, i=1), rec("disambig", 2, 1, 2, 1, i=2)]
    assert math.isnan(M.bias_score_disambig(all_unknown))     # every answer UNKNOWN: s_DIS undefined
    # ambiguous, wrong only on an NA-target item: that item is dropped (upstream), leaving acc 1 → s_AMB 0
    only_na = [rec("ambig", 2, 2, 2, 0, i=1), rec("ambig", 0, 1, 1, None, i=2)]
    assert M.accuracy_ambig(only_na) == 1.0 and M.bias_score_ambig(only_na) == 0.0
    assert math.isnan(M.accuracy_ambig([rec("ambig", 0, 1, 1, None, i=3)]))   # nothing left: undefined


def test_all_unknown_ambiguous_is_zero_by_the_factor():
    recs = [rec("ambig", 2, 2, 2, 0, i=1), rec("ambig", 0, 0, 0, 1, i=2), rec("ambig", 1, 1, 1, 0, i=3)]
    assert M.accuracy_ambig(recs) == 1.0
    assert M.bias_counts(recs, condition="ambig") == (0, 0)
    assert M.bias_score_ambig(recs) == 0.0                    # (1 - 1) * undefined := 0 (documented)
    assert M.bias_score_ambig_helm(recs) == 0.0
    # with a wrong disambiguated item, HELM's factor is no longer 0 and s_DIS' stays undefined
    assert math.isnan(M.bias_score_ambig_helm(recs + [rec("disambig", 1, 0, 2, 0)]))


def test_fully_biased_and_anti_biased_extremes():
    biased = [rec("disambig", 0, 1, 2, 0, i=k) for k in range(4)]
    anti = [rec("disambig", 1, 1, 2, 0, i=k) for k in range(4)]
    assert M.bias_score_disambig(biased) == 100.0
    assert M.bias_score_disambig(anti) == -100.0


# ------------------------------------------------------------------ loader
def _row(eid, *, cond="disambig", pol="neg", label=1, unknown=0, **over):
    info = {f"ans{k}": ["x", "old" if k != unknown else "unknown"] for k in range(3)}
    info[f"ans{(unknown + 1) % 3}"][1] = "nonOld"
    row = {"example_id": eid, "question_index": "1", "question_polarity": pol, "context_condition": cond,
           "category": "Age", "answer_info": info,
           "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": "a", "source": ""},
           "context": f"context {eid}", "question": "Who?", "ans0": "Unknown", "ans1": "The old man",
           "ans2": "The young man", "label": label}
    row.update(over)
    return row


def write_bbq(tmp_path, rows, targets=None, category="Age"):
    d = tmp_path / "bbq"
    d.mkdir(exist_ok=True)
    (d / f"{category}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    targets = targets if targets is not None else {r["example_id"]: "1" for r in rows}
    lines = ["category,question_index,example_id,target_loc,label_type,Known_stereotyped_groups,Relevant_social_values"]
    lines += [f"{category},1,{eid},{t},label,old,x" for eid, t in targets.items()]
    (d / "target_loc_derived.csv").write_text("\n".join(lines) + "\n")
    return d


def test_loader_finds_unknown_from_answer_info(tmp_path):
    d = write_bbq(tmp_path, [_row(0, cond="ambig", label=0, unknown=0), _row(1, label=2, unknown=0)],
                  targets={0: "1", 1: ""})
    items = load_bbq_items(["Age"], data_dir=d)
    assert [it.id for it in items] == ["bbq-Age-0", "bbq-Age-1"]
    assert items[0].meta["unknown"] == 0 and items[0].gold == 0       # unknown is ans0, not ans2
    assert items[0].meta["target"] == 1 and items[1].meta["target"] is None
    assert items[0].meta["context_condition"] == "ambig" and items[0].meta["category"] == "Age"
    assert items[0].options == ("Unknown", "The old man", "The young man")


@pytest.mark.parametrize("override, field", [
    ({"label": 3}, "label"),
    ({"label": "1"}, "label"),
    ({"context": ""}, "context"),
    ({"question_polarity": "positive"}, "question_polarity"),
    ({"answer_info": {"ans0": ["a", "old"], "ans1": ["b", "nonOld"], "ans2": ["c", "old"]}}, "answer_info"),
    ({"label": 0}, "label"),     # disambiguated item whose gold is the UNKNOWN option
])
def test_corrupt_row_raises_data_error_with_file_line_field(tmp_path, override, field):
    rows = [_row(0), _row(1, **override)]
    d = write_bbq(tmp_path, rows)
    with pytest.raises(DataError) as e:
        load_bbq_items(["Age"], data_dir=d)
    assert e.value.field == field and e.value.line == 2 and e.value.path.endswith("Age.jsonl")
    assert "line 2" in str(e.value)


def test_corrupt_target_file_and_missing_join(tmp_path):
    d = write_bbq(tmp_path, [_row(0)], targets={0: "7"})
    with pytest.raises(DataError) as e:
        load_bbq_items(["Age"], data_dir=d)
    assert e.value.field == "target_loc" and e.value.path.endswith("target_loc_derived.csv")
    d = write_bbq(tmp_path, [_row(0), _row(1)], targets={0: "1"})
    with pytest.raises(DataError, match="no row for Age example 1"):
        load_bbq_items(["Age"], data_dir=d)
    d = write_bbq(tmp_path, [_row(0)], targets={0: "0"})   # target is the unknown option
    with pytest.raises(DataError, match="UNKNOWN"):
        load_bbq_items(["Age"], data_dir=d)


def test_vendored_data_loads_and_is_consistent():
    assert len(load_bbq_items(UPSTREAM_CATEGORIES)) == 17628
    items = load_bbq_items(BBQ_CATEGORIES)
    assert len(items) == 58492   # the full benchmark: 7 upstream + 4 regenerated from the templates
    assert load_bbq_items(BBQ_CATEGORIES)[0] is items[0]     # cached
    assert sum(it.meta["target"] is None for it in items) == 16   # the upstream Gender_identity 13 rows only
    regen = [it for it in items if it.meta["category"] in REGENERATED_CATEGORIES]
    assert len(regen) == 6864 + 6880 + 11160 + 15960
    assert all(it.id.startswith("bbq-regen-") and it.meta["source"].startswith("regenerated from templates")
               for it in regen)
    assert all(it.meta["source"].startswith("upstream") for it in items if it not in regen[:1] and
               it.meta["category"] in UPSTREAM_CATEGORIES)
    assert all(it.meta["target"] != it.meta["unknown"] for it in items)
    assert {it.meta["unknown"] for it in items} == {0, 1, 2}
    amb = [it for it in items if it.meta["context_condition"] == "ambig"]
    assert len(amb) == 58492 // 2 and all(it.gold == it.meta["unknown"] for it in amb)
    with pytest.raises(BiaslabError, match="did you mean|Valid choices"):
        load_bbq_items(["Race"])


# ------------------------------------------------------------------ benchmark
def test_instruction_option_validated():
    assert BBQ().opts["instructions"] == 3 and BBQ().instruction_ids == [0, 1, 2]
    assert get_benchmark("bbq", instructions=10).instruction_ids == list(range(10))
    for bad in (0, 11, -1, "3", 2.0):
        with pytest.raises(BiaslabError, match="instructions"):
            BBQ(instructions=bad)
    assert BBQ().protocol().id == "bbq.letter.v2" and BBQ().protocol("option-loglik").id == "bbq.option-loglik.v2"


def test_stratified_limit_is_balanced_and_seeded():
    b = BBQ()
    items = b.load_items()
    s = b.sample(items, 44, seed=0)
    cells = {}
    for d in s:
        cells[(d["category"], d["context_condition"])] = cells.get((d["category"], d["context_condition"]), 0) + 1
    assert len(cells) == 22 and set(cells.values()) == {2}   # 11 categories × 2 context conditions
    assert [d["id"] for d in b.sample(items, 44, seed=0)] == [d["id"] for d in s]
    assert [d["id"] for d in b.sample(items, 44, seed=1)] != [d["id"] for d in s]


@pytest.mark.parametrize("protocol", ["letter", "option-loglik"])
def test_scoring_on_tiny_lm(tiny_lm, protocol):
    b = BBQ(instructions=2)
    items = b.sample(b.load_items(), 4, seed=0)
    recs = b.score(tiny_lm, items, protocol=b.protocol(protocol))
    assert len(recs) == 8 and {r["instruction"] for r in recs} == {0, 1}
    for r in recs:
        assert len(r["logprobs"]) == 3 and all(x <= 0 for x in r["logprobs"])
        assert r["pred"] == max(range(3), key=lambda k: r["logprobs"][k])
        assert r["correct"] == int(r["pred"] == r["gold"]) and r["category"] in BBQ_CATEGORIES
        assert "unknown" in r and "target" in r
    # deterministic
    assert b.score(tiny_lm, items, protocol=b.protocol(protocol)) == recs


def test_audit_on_tiny_lm_reports_mean_and_std_over_instructions(tiny_lm):
    from biaslab.auditing import audit

    res = audit(tiny_lm, ["bbq"], limit=22, n_boot=20, instructions=2)
    sec = res.results["benchmarks"]["bbq"]
    assert sec["protocol"] == "bbq.letter.v2" and sec["n_items"] == 22 and sec["n_records"] == 44
    assert set(sec["groups"]) == set(BBQ_CATEGORIES)
    src = sec["extra"]["sources"]   # every result says which categories are upstream and which regenerated
    assert {c for c, v in src.items() if v["label"].startswith("regenerated from templates")} == set(REGENERATED_CATEGORIES)
    for name in ("accuracy", "accuracy_ambig", "accuracy_disambig", "bias_score_ambig", "bias_score_disambig"):
        m = sec["metrics"][name]
        assert "std" in m and len(m["per_instruction"]) == 2
    assert 0 <= sec["metrics"]["accuracy"]["value"] <= 1
    assert sec["extra"]["instructions"] == [0, 1]
    assert sum(v["n_items"] for v in sec["extra"]["by_label_type"].values()) == 22


def test_generate_protocol_matches_answers_and_leaves_unmatched_out(tiny_lm, monkeypatch):
    """bbq.generate.v1: greedy answers matched to options (letter, text, an unknown paraphrase); an answer naming
    no option is left out of the metrics and counted in unmatched_rate (the authors' convention)."""
    from biaslab.benchmarks import get_benchmark
    from biaslab.tasks import score_mc

    b = get_benchmark("bbq", instructions=1)
    items = [d["item"] for d in b.load_items()[:4]]
    answers = ["B", "the weather\nand more", items[2].options[items[2].gold] + ".", "Can't be determined"]
    monkeypatch.setattr(tiny_lm, "generate", lambda prompts, **kw: answers[:len(prompts)])
    recs = score_mc(tiny_lm, items, [0], protocol="generate")
    assert [r["pred"] for r in recs] == [1, None, items[2].gold, items[3].meta["unknown"]]
    assert [r["matched"] for r in recs] == [True, False, True, True] and recs[1]["answer"] == "the weather"
    assert M.unmatched_rate(recs) == pytest.approx(0.25)
    kept = [r for r in recs if r["pred"] is not None]
    assert M.accuracy(recs) == pytest.approx(sum(r["pred"] == r["gold"] for r in kept) / 3)
    assert "unmatched_rate" in [d.name for d in b.metric_defs(b.protocol("generate"))]


def test_a_users_upstream_copy_is_sha256_checked_and_labelled(tmp_path, monkeypatch):
    """--bbq-dir / BIASLAB_BBQ_DIR: byte-identical upstream files are used and labelled 'upstream (user copy …)';
    a file with another hash is refused naming both hashes; a non-vendored category needs additional_metadata.csv."""
    import shutil

    from biaslab.benchmarks import bbq_sources as S
    from biaslab.benchmarks.bbq import BBQ
    from biaslab.data import DATA_ROOT, sha256_file

    d = tmp_path / "bbq"
    d.mkdir()
    shutil.copy(DATA_ROOT / "bbq" / "Religion.jsonl", d / "Religion.jsonl")
    monkeypatch.setenv(S.ENV, str(d))
    b = BBQ()
    items = b.load_items()
    assert b.sources["Religion"]["label"].startswith("upstream (user copy") and len(items) == 58492
    assert b.sources["Age"]["label"].startswith("upstream (vendored")
    (d / "Religion.jsonl").write_bytes((DATA_ROOT / "bbq" / "Religion.jsonl").read_bytes() + b"\n")
    with pytest.raises(BiaslabError, match="Religion.jsonl is not the upstream BBQ file: sha256 [0-9a-f]{64}, upstream cb9555"):
        BBQ().load_items()
    # a category biaslab does not vendor (SES), with its bias targets from the user's additional_metadata.csv
    (d / "Religion.jsonl").unlink()
    row = json.loads((DATA_ROOT / "bbq" / "Religion.jsonl").read_text().splitlines()[0])
    row["category"] = "SES"
    (d / "SES.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setitem(S.UPSTREAM_SHA256, "SES", sha256_file(d / "SES.jsonl"))
    with pytest.raises(BiaslabError, match="need their bias targets: put the upstream additional_metadata.csv"):
        BBQ().load_items()
    (d / "additional_metadata.csv").write_text("category,question_index,example_id,target_loc\n"
                                               f"SES,{row['question_index']},{row['example_id']},NA\n")
    b = BBQ()
    ses = [it for it in b.load_items() if it["category"] == "SES"]
    # the user's upstream file replaces the regenerated one, with upstream ids
    assert len(ses) == 1 and b.sources["SES"]["label"].startswith("upstream (user copy")
    assert ses[0]["id"] == f"bbq-SES-{row['example_id']}" and ses[0]["source"].startswith("upstream (user copy")
