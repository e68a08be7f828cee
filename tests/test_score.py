"""`biaslab score`: predictions made elsewhere → the audit's metrics; bad rows are one clear line (issue 19, part 5)."""
from __future__ import annotations

import json

import pytest

from biaslab.benchmarks import get_benchmark
from biaslab.benchmarks.external import match_option, read_predictions, to_records
from biaslab.errors import BiaslabError, DataError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, want", [("B", 1), ("(c)", 2), ("b.", 1), ("The grandfather", 0),
                                        ("grandfather.", 0), ("Cannot be determined", 2), ("Can't answer", 2),
                                        ("B. The grandson", 1), ("(C) Unknown", 2), ("A grandfather", 0),
                                        ("the weather", None), ("", None)])
def test_free_text_answers_match_options_as_upstream(text, want):
    assert match_option(text, ("grandfather", "grandson", "Unknown"), unknown=2) == want


def test_bbq_predictions_give_the_audit_metrics(tmp_path):
    """Golden: two items predicted by hand — one correct, one wrong — accuracy 0.5; an unmatched answer is
    counted and left out."""
    b = get_benchmark("bbq")
    items = [it["item"] for it in b.load_items()[:3]]
    rows = [{"id": items[0].id, "pred": items[0].gold}, {"id": items[1].id, "pred": (items[1].gold + 1) % 3},
            {"id": items[2].id, "pred_text": "no idea what the weather is"}]
    recs, counts = to_records(b, read_predictions(_write(tmp_path / "p.jsonl", rows)), tmp_path / "p.jsonl",
                              partial=True)
    assert counts == {"predicted": 3, "scored": 2, "unmatched": 1, "items_without_prediction": len(b.load_items()) - 3}
    from biaslab.metrics import bbq as M

    assert M.accuracy(recs) == pytest.approx(0.5)


@pytest.mark.parametrize("rows, match", [
    ([{"id": "nope", "pred": 0}], "line 1.*unknown bbq item id 'nope'"),
    ([{"pred": 0}], "line 1.*string 'id'"),
    ([{"id": "X", "pred": 0}, {"id": "X", "pred": 1}], "line 2.*duplicate id 'X'"),
])
def test_bad_prediction_rows_name_the_line(tmp_path, rows, match):
    b = get_benchmark("bbq")
    with pytest.raises((BiaslabError, DataError), match=match):
        to_records(b, read_predictions(_write(tmp_path / "p.jsonl", rows)), tmp_path / "p.jsonl", partial=True)


def test_a_prediction_outside_the_options_is_refused(tmp_path):
    b = get_benchmark("bbq")
    it = b.load_items()[0]["item"]
    with pytest.raises(DataError, match="line 1.*pred.*option index 0–2, got 7"):
        to_records(b, read_predictions(_write(tmp_path / "p.jsonl", [{"id": it.id, "pred": 7}])), tmp_path / "p.jsonl",
                   partial=True)


def test_missing_items_need_partial(tmp_path):
    b = get_benchmark("crows")
    it = b.load_items()[0]
    f = _write(tmp_path / "p.jsonl", [{"id": it["id"], "pred": 0}])
    with pytest.raises(BiaslabError, match="1,507 of the 1,508 crows items have no prediction"):
        to_records(b, read_predictions(f), f)
    recs, _ = to_records(b, read_predictions(f), f, partial=True)
    assert recs[0]["score_more"] > recs[0]["score_less"]


def test_score_writes_a_run_directory_with_a_report(tmp_path):
    from biaslab.score import score_predictions

    b = get_benchmark("stereoset")
    rows = [{"id": it["id"], "scores": [-1.0, -2.0, -3.0]} for it in b.load_items()[:30]]
    res = score_predictions("stereoset", predictions=_write(tmp_path / "p.jsonl", rows), out=tmp_path / "run",
                            n_boot=20, partial=True)
    assert res.metric("stereoset", "ss") == pytest.approx(100.0) and res.metric("stereoset", "lms") == pytest.approx(100.0)
    assert (tmp_path / "run" / "report.html").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["benchmarks"]["stereoset"]["protocol"] == \
        "stereoset.external.v1"


# lm-eval 0.4.13's tasks/bbq: the two non-unknown answers, then its ten unknown phrasings (HELM's) as choices
LMEVAL_UNKNOWNS = ["Unknown", "Cannot answer", "Can't be determined", "Cannot be determined", "Can't answer",
                   "Not known", "Not enough info", "Not enough information", "Not answerable", "Undetermined"]


def _lmeval_choices(item) -> list[str]:
    return [o for j, o in enumerate(item.options) if j != item.meta["unknown"]] + LMEVAL_UNKNOWNS


def _lmeval_bbq_sample(item, best: str, *, dict_args=True):
    """One line of lm-eval's ``--log_samples`` file for its ``bbq`` multiple-choice task, as its EvaluationTracker
    writes it: one (context, " " + choice) request per choice under ``gen_args_i`` / ``arg_j``, every response
    sanitised to strings; ``best`` is the choice with the highest log-likelihood."""
    choices = _lmeval_choices(item)
    reqs = [[f"{item.context}\n\nQ: {item.question}\nA:", " " + c] for c in choices]
    args = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(r)} for i, r in enumerate(reqs)} if dict_args \
        else reqs
    lls = [-1.0 if c == best else -5.0 - i for i, c in enumerate(choices)]
    cat, ex = item.id.removeprefix("bbq-").rsplit("-", 1)
    return {"doc_id": 0, "doc": {"example_id": int(ex), "category": cat, "context": item.context},
            "target": "0", "arguments": args, "resps": [[[str(x), "False"]] for x in lls],
            "filtered_resps": [[str(x), "False"] for x in lls], "acc": 0.0}


def test_lmeval_samples_in_both_argument_layouts(tmp_path):
    """lm-eval ≥ 0.4 writes ``arguments`` as {"gen_args_0": {"arg_0": ctx, "arg_1": continuation}}; older files
    as a list of pairs. Golden: the argmax choice's text is the prediction — an unknown phrasing is the unknown
    option; then a wrong answer, then a right one."""
    from biaslab.benchmarks.external import from_lmeval_samples
    from biaslab.metrics import bbq as M

    b = get_benchmark("bbq")
    items = [it["item"] for it in b.load_items()[:3]]
    assert items[0].gold == items[0].meta["unknown"]   # an ambiguous item: "unknown" is right
    wrong = (items[1].gold + 1) % 3
    picks = ["Not answerable", items[1].options[wrong] if wrong != items[1].meta["unknown"] else "Undetermined",
             items[2].options[items[2].gold] if items[2].gold != items[2].meta["unknown"] else "Not known"]
    samples = [_lmeval_bbq_sample(items[0], picks[0]), _lmeval_bbq_sample(items[1], picks[1]),
               _lmeval_bbq_sample(items[2], picks[2], dict_args=False)]
    f = _write(tmp_path / "samples_bbq_2026.jsonl", samples)
    rows, left_out = from_lmeval_samples(b, f)
    assert [r["id"] for r in rows] == [it.id for it in items] and left_out == {}
    recs, counts = to_records(b, rows, f, partial=True)
    assert counts["scored"] == 3 and counts["unmatched"] == 0
    assert [r["pred"] for r in recs] == [items[0].gold, wrong, items[2].gold]
    assert M.accuracy(recs) == pytest.approx(2 / 3)
    # the chosen choice is mapped by its exact text, so the BBQ authors' matcher (which knows only the item's own
    # unknown wording, here "Can't be determined") cannot drop lm-eval's "Not answerable"
    assert items[0].options[items[0].gold] != "Not answerable"
    recs, counts = to_records(b, rows, f, partial=True, text_match="bbq-authors")
    assert counts["unmatched"] == 0 and [r["pred"] for r in recs] == [items[0].gold, wrong, items[2].gold]


def test_lmeval_samples_without_choice_texts_name_the_line(tmp_path):
    from biaslab.benchmarks.external import from_lmeval_samples

    b = get_benchmark("bbq")
    it = b.load_items()[0]["item"]
    bad = {**_lmeval_bbq_sample(it, "Unknown"), "arguments": {}}
    f = _write(tmp_path / "s.jsonl", [_lmeval_bbq_sample(it, "Unknown"), bad])
    with pytest.raises(DataError, match=r"s\.jsonl.*line 2.*arguments.*the text of each of the 12 scored choices"):
        from_lmeval_samples(b, f)


def test_lmeval_crows_samples(tmp_path):
    from biaslab.benchmarks.external import from_lmeval_samples

    b = get_benchmark("crows")
    its = b.load_items()[:2]
    rows = [{"doc": {"sent_more": it["sent_more"], "sent_less": it["sent_less"]}, "arguments": {},
             "filtered_resps": [["-10.5", "False"], ["-12.0", "False"]] if k == 0 else [["-3", "False"], ["-1", "False"]]}
            for k, it in enumerate(its)]
    rows[1]["doc"]["sent_more"] = "  " + its[1]["sent_more"].replace(" ", "  ") + " "   # whitespace is not text
    f = _write(tmp_path / "samples_crows.jsonl", rows)
    recs, _ = to_records(b, from_lmeval_samples(b, f)[0], f, partial=True)
    assert [(r["id"], r["score_more"], r["score_less"]) for r in recs] == [(its[0]["id"], -10.5, -12.0),
                                                                          (its[1]["id"], -3.0, -1.0)]


def test_items_out_lists_what_to_predict():
    from biaslab.benchmarks.external import items_for_predictions

    b = get_benchmark("bbq")
    rows = items_for_predictions(b)
    first = b.load_items()[0]["item"]
    assert len(rows) == len(b.load_items())
    assert rows[0] == {"id": first.id, "context": first.context, "question": first.question,
                       "options": list(first.options)}
    st = items_for_predictions(get_benchmark("stereoset"))[0]
    assert set(st) == {"id", "context", "sentences"} and len(st["sentences"]) == 3


def test_lmeval_samples_of_a_regenerated_category_need_the_upstream_copy(tmp_path, monkeypatch):
    """lm-eval scored upstream's items: a category biaslab holds regenerated (other items, ids bbq-regen-*) is one
    line saying to give the upstream copy; with --bbq-dir (here a one-row SES file) the doc maps to its item."""
    from biaslab.benchmarks import bbq_sources as S
    from biaslab.benchmarks.external import from_lmeval_samples
    from biaslab.data import DATA_ROOT, sha256_file
    from biaslab.score import score_predictions

    row = json.loads((DATA_ROOT / "bbq" / "Religion.jsonl").read_text().splitlines()[0])
    row["category"] = "SES"

    class Item:   # the doc lm-eval logs for this row
        id, context, question = f"bbq-SES-{row['example_id']}", row["context"], row["question"]
        options, meta = (row["ans0"], row["ans1"], row["ans2"]), {"unknown": next(
            j for j in range(3) if row[f"ans{j}"] in LMEVAL_UNKNOWNS)}
    f = _write(tmp_path / "samples_bbq.jsonl", [_lmeval_bbq_sample(Item, "Unknown")])
    with pytest.raises(DataError, match=r"line 1.*doc\.category.*SES is regenerated from the templates.*--bbq-dir"):
        from_lmeval_samples(get_benchmark("bbq"), f)
    ok = _write(tmp_path / "two.jsonl", [_lmeval_bbq_sample(Item, "Unknown"), _lmeval_bbq_sample(
        get_benchmark("bbq").load_items()[0]["item"], "Unknown")])
    kept, left_out = from_lmeval_samples(get_benchmark("bbq"), ok, partial=True)
    assert [r["_line"] for r in kept] == [2] and list(left_out.values()) == [1]

    d = tmp_path / "bbq"
    d.mkdir()
    (d / "SES.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setitem(S.UPSTREAM_SHA256, "SES", sha256_file(d / "SES.jsonl"))
    (d / "additional_metadata.csv").write_text("category,question_index,example_id,target_loc\n"
                                               f"SES,{row['question_index']},{row['example_id']},NA\n")
    res = score_predictions("bbq", lmeval_samples=f, bbq_dir=d, partial=True, n_boot=10, out=tmp_path / "run")
    sec = res.results["benchmarks"]["bbq"]
    assert sec["predictions"]["scored"] == 1 and res.records["bbq"][0]["id"] == Item.id
    assert res.records["bbq"][0]["pred"] == Item.meta["unknown"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["args"]["bbq_dir"] == str(d)
    with pytest.raises(BiaslabError, match="--bbq-dir is BBQ's data; it does nothing for crows"):
        score_predictions("crows", lmeval_samples=f, bbq_dir=d)


def test_lmeval_docs_without_a_biaslab_item_are_errors_or_counted_with_partial(tmp_path):
    """lm-eval's CrowS-Pairs is the revised English version: a pair it changed has no biaslab item — an error naming
    the line, or, with --partial, left out, counted and noted in the results."""
    from biaslab.benchmarks.external import REVISED_CROWS, from_lmeval_samples
    from biaslab.score import score_predictions

    b = get_benchmark("crows")
    it = b.load_items()[0]
    rows = [{"doc": {"sent_more": it["sent_more"], "sent_less": it["sent_less"]}, "filtered_resps": [["-1", "F"], ["-2", "F"]]},
            {"doc": {"sent_more": "A revised sentence .", "sent_less": "Another one ."}, "filtered_resps": [["-1", "F"], ["-2", "F"]]}]
    f = _write(tmp_path / "samples_crows.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2.*not one of biaslab's 1,508.*revised English version.*--partial"):
        from_lmeval_samples(b, f)
    kept, left_out = from_lmeval_samples(b, f, partial=True)
    assert [r["id"] for r in kept] == [it["id"]] and left_out == {REVISED_CROWS: 1}
    res = score_predictions("crows", lmeval_samples=f, partial=True, n_boot=10)
    sec = res.results["benchmarks"]["crows"]
    assert sec["predictions"]["docs_left_out"] == {REVISED_CROWS: 1} and sec["predictions"]["scored"] == 1
    assert any("1 lm-eval docs left out (--partial)" in n for n in sec["notes"])
