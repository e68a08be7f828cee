"""Checking the generator against the upstream files of the categories that are present.

For each category: (1) rows per (template, version, context condition, question polarity) must equal upstream's;
(2) the share of upstream rows that the regenerated file holds text for text — context, question, the two named
answers with their ``answer_info`` tags, which answer is gold — overall and over the templates that drew no filler at random, where it must be
1.0 (the UNKNOWN paraphrase and the answer order are drawn in every template, so they are not compared); (3) the
``target_loc`` port (:mod:`.targets`) applied to the upstream rows must equal the vendored
``target_loc_derived.csv`` (an independent port of the R script) on every row.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...data import DATA_ROOT, read_csv, read_jsonl
from . import TEMPLATES, generate
from .targets import single_target
from .templates import read_templates


def _cell(r: dict) -> tuple:
    return (str(r["question_index"]), str(r["additional_metadata"]["version"]), r["context_condition"],
            r["question_polarity"])


def _text(r: dict) -> tuple:
    unknown = next(k for k in range(3) if r["answer_info"][f"ans{k}"][1] == "unknown")
    named = tuple(sorted((r[f"ans{k}"], *r["answer_info"][f"ans{k}"]) for k in range(3) if k != unknown))
    gold = "UNKNOWN" if r["label"] == unknown else r[f"ans{r['label']}"]
    return _cell(r) + (r["context"], r["question"], named, gold)


def _template_for(row: dict, templates) -> object:
    """The template row an upstream row came from: same Q_id and version, and (where a template is listed with
    several stereotyped-group variants) the variant equal to the row's own stereotyped_groups."""
    qi, ver = str(row["question_index"]), str(row["additional_metadata"]["version"])
    cands = [t for t in templates if t["Q_id"] == qi and (t["version"] if t.has("version") else "None") == ver]
    for t in cands:
        if t.literal_list("Known_stereotyped_groups") == row["additional_metadata"]["stereotyped_groups"]:
            return t
    return cands[0] if cands else None


def validate_category(cat: str, upstream: Path, seed: int = 0) -> dict:
    sampled: dict = {}
    rows, _ = generate(cat, seed=seed, sampled=sampled)
    up = [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(upstream)]
    mine_cells, up_cells = Counter(map(_cell, rows)), Counter(map(_cell, up))
    cell_diffs = {k: (mine_cells.get(k, 0), up_cells.get(k, 0)) for k in set(mine_cells) | set(up_cells)
                  if mine_cells.get(k, 0) != up_cells.get(k, 0)}
    mine_text = Counter(map(_text, rows))
    fixed = {k for k, v in sampled.items() if not v}

    def share(subset):
        want = Counter(_text(r) for r in up if subset(r))
        n = sum(want.values())
        return (sum(min(c, mine_text.get(k, 0)) for k, c in want.items()) / n if n else None), n

    identical, n_up = share(lambda r: True)
    identical_fixed, n_fixed = share(lambda r: (_cell(r)[0], _cell(r)[1]) in fixed)
    # the target port on the upstream rows, against target_loc_derived.csv
    templates = read_templates(TEMPLATES / f"{cat}.csv", "single")
    derived = {(r["category"], r["example_id"]): r["target_loc"] for r in
               read_csv(DATA_ROOT / "bbq" / "target_loc_derived.csv") if r["category"] == cat}
    agree = disagree = 0
    for r in up:
        t = _template_for(r, templates)
        mine = single_target(r, t["Known_stereotyped_groups"]) if t is not None else None
        theirs = derived.get((cat, str(r["example_id"])), "")
        if ("" if mine is None else str(mine)) == theirs:
            agree += 1
        else:
            disagree += 1
    return {"category": cat, "rows": len(rows), "upstream_rows": len(up), "cells": len(up_cells),
            "cells_differing": len(cell_diffs), "cell_diffs": sorted(cell_diffs.items())[:10],
            "identical_share": identical, "templates": len(sampled), "templates_without_draws": len(fixed),
            "rows_without_draws": n_fixed, "identical_share_without_draws": identical_fixed,
            "target_port_agree": agree, "target_port_disagree": disagree}


def table(results: list[dict]) -> str:
    head = ("| category | rows (regen / upstream) | cells (t × v × cond × pol) differing | identical items | "
            "templates without random fillers | their items identical | target_loc port = derived csv |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results:
        fx = r["identical_share_without_draws"]
        lines.append(f"| {r['category']} | {r['rows']:,} / {r['upstream_rows']:,} | {r['cells_differing']} of "
                     f"{r['cells']} | {r['identical_share']:.1%} | {r['templates_without_draws']} of {r['templates']} "
                     f"({r['rows_without_draws']:,} rows) | {'–' if fx is None else f'{fx:.1%}'} | "
                     f"{r['target_port_agree']:,} / {r['target_port_agree'] + r['target_port_disagree']:,} |")
    return head + "\n".join(lines) + "\n"
