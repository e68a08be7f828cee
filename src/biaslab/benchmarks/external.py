"""Predictions made elsewhere (an API model, another harness) turned into a benchmark's records, so that
``biaslab score`` computes the same metrics, intervals, groups, run directory and report as an audit.

The predictions file is JSON Lines, one object per item (docs/benchmarks.md, "Scoring predictions"):

* ``bbq``, ``winobias`` — ``{"id": ITEM_ID, "pred": OPTION_INDEX}``, or ``"pred_text": "..."`` (matched to an
  option: its letter, its text after normalisation — lower case, no punctuation or articles — or, on BBQ, one
  of the "unknown" paraphrases for the unknown option; an answer that matches no option is counted as
  *unmatched* and left out, as the BBQ authors' analysis does), optionally ``"scores": [one per option]``;
* ``crows`` — ``{"id": ITEM_ID, "scores": [score_more, score_less]}`` (any log-likelihood-like score of the more
  and the less stereotyping sentence) or ``"pred": 0`` (the more stereotyping sentence preferred) / ``1``;
* ``stereoset`` — ``{"id": ITEM_ID, "scores": [stereotype, anti_stereotype, unrelated]}``.

``biaslab score --bench B --items-out FILE`` writes the items with their ids, so predictions can be made for them.
:func:`from_lmeval_samples` reads lm-evaluation-harness ``--log_samples`` files of its BBQ and CrowS-Pairs tasks.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..answers import UNKNOWN_PARAPHRASES, match_option, match_option_bbq_authors, normalise  # noqa: F401
from ..errors import BiaslabError, DataError, UnknownNameError

BENCHES = ("bbq", "crows", "stereoset", "winobias")


def _json_lines(p: Path, flag: str):
    """(line number, raw text) of each non-blank line of an existing JSON Lines file."""
    if not p.is_file():
        raise BiaslabError(f"{flag} {p}: no such file")
    with open(p, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def _unique(p: Path, rows: list[dict], field: str, what: str) -> list[dict]:
    """``rows`` (each with ``id`` and ``_line``) unless an id repeats: then an error naming both lines."""
    if not rows:
        raise DataError(p, None, None, f"holds no {what}")
    seen: dict[str, int] = {}
    for r in rows:
        if r["id"] in seen:
            raise DataError(p, r["_line"], field, f"duplicate id {r['id']!r} (first on line {seen[r['id']]})")
        seen[r["id"]] = r["_line"]
    return rows


def read_predictions(path) -> list[dict]:
    """Rows of a predictions file, each with its ``_line``; bad JSON or a missing id is an error naming the line."""
    p = Path(path)
    rows = []
    for n, raw in _json_lines(p, "--predictions"):
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise DataError(p, n, None, f"not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise DataError(p, n, "id", "each line needs a string 'id' (the benchmark's item id; "
                                        "`biaslab score --items-out` lists them)")
        rows.append({**row, "_line": n})
    return _unique(p, rows, "id", "predictions")


def _scores(p, row, n: int, what: str) -> list[float] | None:
    s = row.get("scores")
    if s is None:
        return None
    if not isinstance(s, list) or len(s) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in s):
        raise DataError(p, row["_line"], "scores", f"expected a list of {n} numbers ({what})")
    return [float(x) for x in s]


TEXT_MATCHERS = ("biaslab", "bbq-authors")


def to_records(bench, rows: list[dict], path, *, partial: bool = False,
               text_match: str = "biaslab") -> tuple[list[dict], dict]:
    """(records in the benchmark's own format, counts: matched, unmatched, missing). Unknown ids are errors;
    items without a prediction are an error unless ``partial`` (then only the predicted items are scored).
    ``text_match`` reads ``pred_text``: ``biaslab`` (:func:`biaslab.answers.match_option`) or ``bbq-authors``
    (the BBQ authors' R script, :func:`biaslab.answers.match_option_bbq_authors`; BBQ only)."""
    if text_match not in TEXT_MATCHERS:
        raise UnknownNameError("text matcher", text_match, TEXT_MATCHERS)
    if text_match == "bbq-authors" and bench.name != "bbq":
        raise BiaslabError(f"--text-match bbq-authors is the BBQ authors' convention; {bench.name} has no answer_info")
    if bench.name not in BENCHES:
        raise BiaslabError(f"biaslab score supports {', '.join(BENCHES)}; not {bench.name!r}")
    p = Path(path)
    items = {it["id"]: it for it in bench.load_items()}
    for r in rows:
        if r["id"] not in items:
            raise DataError(p, r["_line"], "id", f"unknown {bench.name} item id {r['id']!r}")
    missing = len(items) - len(rows)
    if missing and not partial:
        raise BiaslabError(f"{p}: {missing:,} of the {len(items):,} {bench.name} items have no prediction; give "
                           "them all, or --partial to score only the predicted items (the result says so)")
    records, unmatched = [], 0
    for r in rows:
        it = items[r["id"]]
        rec = _record(bench.name, it, r, p, text_match)
        if rec is None:
            unmatched += 1
            continue
        records.append(rec)
    if not records:
        raise BiaslabError(f"{p}: no prediction matched an option; nothing to score")
    return records, {"predicted": len(rows), "scored": len(records), "unmatched": unmatched,
                     "items_without_prediction": missing}


def _record(name: str, it: dict, r: dict, p, text_match: str = "biaslab") -> dict | None:
    line = r["_line"]
    if name in ("bbq", "winobias"):
        item = it["item"]
        k = len(item.options)
        scores = _scores(p, r, k, "one per option")
        if "pred" in r:
            pred = r["pred"]
            if isinstance(pred, bool) or not isinstance(pred, int) or not 0 <= pred < k:
                raise DataError(p, line, "pred", f"expected an option index 0–{k - 1}, got {pred!r}")
        elif "pred_text" in r:
            if not isinstance(r["pred_text"], str):
                raise DataError(p, line, "pred_text", "expected a string")
            pred = (match_option_bbq_authors(r["pred_text"], item.options, item.labels) if text_match == "bbq-authors"
                    else match_option(r["pred_text"], item.options, unknown=item.meta.get("unknown")))
            if pred is None:
                return None
        elif scores is not None:
            pred = max(range(k), key=lambda j: (scores[j], -j))
        else:
            raise DataError(p, line, "pred", "give 'pred' (option index), 'pred_text' or 'scores'")
        return {"id": item.id, "instruction": 0, "logprobs": scores or [0.0 if j == pred else -1.0 for j in range(k)],
                "pred": pred, "gold": item.gold, "correct": int(pred == item.gold), **item.meta}
    if name == "crows":
        s = _scores(p, r, 2, "score of the more and the less stereotyping sentence")
        if s is None:
            pred = r.get("pred")
            if pred not in (0, 1) or isinstance(pred, bool):
                raise DataError(p, line, "pred", "expected 0 (more stereotyping sentence preferred) or 1, or 'scores'")
            s = [1.0, 0.0] if pred == 0 else [0.0, 1.0]
        return {"id": it["id"], "bias_type": it["bias_type"], "direction": it.get("direction"),
                "score_more": s[0], "score_less": s[1]}
    s = _scores(p, r, 3, "stereotype, anti-stereotype, unrelated")
    if s is None:
        raise DataError(p, line, "scores", "expected [stereotype, anti_stereotype, unrelated] scores")
    return {"id": it["id"], "domain": it["domain"], "target": it["target"], "source": it.get("source"),
            "lp_stereotype": s[0], "lp_anti_stereotype": s[1], "lp_unrelated": s[2]}


def items_for_predictions(bench) -> list[dict]:
    """What a user needs to predict each item elsewhere: its id and its text."""
    out = []
    for it in bench.load_items():
        if bench.name in ("bbq", "winobias"):
            mc = it["item"]
            out.append({"id": mc.id, "context": mc.context, "question": mc.question, "options": list(mc.options)})
        elif bench.name == "crows":
            out.append({"id": it["id"], "sent_more": it.get("sent_more"), "sent_less": it.get("sent_less")})
        else:
            out.append({"id": it["id"], "context": it.get("context"), "sentences": [it["stereotype"],
                        it["anti_stereotype"], it["unrelated"]]})
    return out


def _choice_texts(arguments) -> list[str]:
    """Each loglikelihood request's continuation from a sample's ``arguments``: lm-eval's EvaluationTracker writes
    them as ``{"gen_args_0": {"arg_0": context, "arg_1": continuation}, …}``; older files as a list of
    ``[context, continuation]`` pairs."""
    if isinstance(arguments, dict):
        reqs = [arguments.get(f"gen_args_{i}") for i in range(len(arguments))]
        return [str(a["arg_1"]) for a in reqs if isinstance(a, dict) and "arg_1" in a]
    if isinstance(arguments, list):
        return [str(a[1]) for a in arguments if isinstance(a, (list, tuple)) and len(a) > 1]
    return []


def _lmeval_choice(text: str, item) -> dict:
    """lm-eval's BBQ choices are the item's two named answers and ten unknown phrasings: the chosen one is mapped
    to its option here with biaslab's matcher (``pred``: every unknown phrasing is the unknown option), so
    ``--text-match`` cannot drop an unknown phrasing that differs from the item's own; a text matching no option
    is left to the chosen matcher (``pred_text``)."""
    k = match_option(text, item.options, unknown=item.meta.get("unknown")) if item is not None else None
    return {"pred": k} if k is not None else {"pred_text": text}


REGENERATED_DOCS = "BBQ category regenerated from the templates here (give --bbq-dir for upstream's items)"
REVISED_CROWS = "CrowS-Pairs pair not among biaslab's 1,508 (lm-eval uses the revised English version)"


def _pair_key(a, b) -> tuple[str, str]:
    return " ".join(str(a or "").split()), " ".join(str(b or "").split())


def from_lmeval_samples(bench, path, *, partial: bool = False) -> tuple[list[dict], dict]:
    """(prediction rows, {reason: docs left out}) from an lm-evaluation-harness ``--log_samples`` file
    (``samples_<task>_*.jsonl``) of its BBQ multiple-choice or CrowS-Pairs task: BBQ docs map to ids by category
    and example_id, the argmax choice's text to an option (its unknown paraphrases to the unknown option); CrowS
    docs by their sentence pair (whitespace-normalised). A doc with no biaslab item — a BBQ category regenerated
    here, a CrowS pair that lm-eval's revised English version changed — is an error naming the line, or, with
    ``partial``, left out and counted."""
    from collections import Counter

    p = Path(path)
    rows, skipped = [], Counter()
    crows_ids, bbq_ids, regenerated = None, {}, set()
    if bench.name == "bbq":   # lm-eval scored upstream's items; categories regenerated here have other ids
        bbq_ids = {it["id"]: it["item"] for it in bench.load_items()}
        regenerated = {c for c, v in bench.sources.items() if v["label"].startswith("regenerated")}
    if bench.name == "crows":
        crows_ids = {_pair_key(it.get("sent_more"), it.get("sent_less")): it["id"] for it in bench.load_items()}
    for n, raw in _json_lines(p, "--lmeval-samples"):
        try:
            s = json.loads(raw)
            doc, resps = s["doc"], s["filtered_resps"]
            lls = [float(x[0] if isinstance(x, (list, tuple)) else x) for x in resps]
        except (ValueError, KeyError, TypeError, IndexError):
            raise DataError(p, n, "doc/filtered_resps", "not an lm-eval sample (needs 'doc' and 'filtered_resps')") from None
        if bench.name == "bbq":
            try:
                sid = f"bbq-{doc['category']}-{doc['example_id']}"
            except KeyError:
                raise DataError(p, n, "doc", "a BBQ doc needs 'category' and 'example_id'") from None
            if sid not in bbq_ids and doc["category"] in regenerated:
                if partial:
                    skipped[REGENERATED_DOCS] += 1
                    continue
                raise DataError(p, n, "doc.category", f"{doc['category']} is regenerated from the templates in this "
                                "biaslab (ids bbq-regen-*), not upstream's items that lm-eval scored: give your copy "
                                "of the upstream BBQ data/ folder with --bbq-dir (or BIASLAB_BBQ_DIR), or --partial "
                                "to leave that category's docs out (counted)")
            texts = _choice_texts(s.get("arguments"))
            if len(texts) != len(lls) or not lls:
                raise DataError(p, n, "arguments", f"expected the text of each of the {len(lls)} scored choices "
                                "(lm-eval's (context, continuation) requests), got "
                                f"{len(texts)}") from None
            best = max(range(len(lls)), key=lambda j: (lls[j], -j))
            rows.append({"id": sid, **_lmeval_choice(texts[best], bbq_ids.get(sid)), "_line": n})
        elif bench.name == "crows":
            key = _pair_key(doc.get("sent_more"), doc.get("sent_less"))
            if key not in crows_ids:
                if partial:
                    skipped[REVISED_CROWS] += 1
                    continue
                raise DataError(p, n, "doc", "this CrowS-Pairs pair is not one of biaslab's 1,508 (lm-eval's "
                                "revised English version changed some): --partial scores the pairs that match and "
                                "counts the others")
            rows.append({"id": crows_ids[key], "scores": lls[:2], "_line": n})
        else:
            raise BiaslabError("lm-eval samples are read for bbq and crows")
    return _unique(p, rows, "doc", "samples"), dict(skipped)
