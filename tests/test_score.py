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
