"""Supplement to run.py: the held-out gender SS split by the gender of the stereotyped target (no model run).

Reads the per-pair records that run.py leaves in experiments/fast/runs/gender/{before,after,baselines/*}/ and
reports SS and the mean gap log P(o|s1,r) − log P(o|s2,r) separately for pairs whose target s1 is female
(mother, sister, schoolgirl, …) and male (grandfather, schoolboy, gentlemen, …). The base model prefers the
male version of a prompt for most objects, so female-target pairs sit far below 50 and male-target pairs near
it; an edit that removes that offset moves the two halves in opposite directions and can leave the pooled SS
unchanged. Post-hoc analysis only: nothing here chose a setting.

Run after run.py:  .venv/bin/python experiments/fast/gender_targets.py   → gender_targets.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    from diagnose import FEMALE

    from biaslab.methods import fast as F
    from biaslab.runs import atomic_write_text

    pairs, _ = F.build_stereoset_pairs(("gender",))
    female = {p.id: p.prompt_1[p.span_1[0]:p.span_1[1]].lower() in FEMALE for p in pairs}
    run = HERE / "runs" / "gender"
    lines = ["# Held-out gender SS by the target's gender (`experiments/fast/gender_targets.py`)", "",
             "| state | female-target SS | female mean gap | male-target SS | male mean gap | pooled SS |",
             "|---|---|---|---|---|---|"]
    for name, sub in (("before", "before"), ("FAST", "after"), ("stamp α=β=0", "baselines/stamp_no_retention"),
                      ("FT-L", "baselines/ft_l")):
        path = run / sub / "records.jsonl"
        if not path.is_file():
            continue
        recs = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("set") == "ss"]
        cells = []
        for want in (True, False):
            sel = [r for r in recs if female[r["id"]] == want]
            cells += [f"{100 * sum(r['pref'] for r in sel) / len(sel):.1f} (n={len(sel)})",
                      f"{sum(r['lp_1'] - r['lp_2'] for r in sel) / len(sel):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * sum(r['pref'] for r in recs) / len(recs):.1f} |")
    lines += ["", "Gap in nats (summed object log-prob); negative = the counterpart (opposite-gender) prompt is preferred."]
    atomic_write_text(HERE / "gender_targets.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
