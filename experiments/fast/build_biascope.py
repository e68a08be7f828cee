"""Build the vendored BiaScope evaluation sets (deterministic; rerun after changing the pair construction):

- src/biaslab/data/biascope/paraphrases.jsonl   rule-based paraphrases of every StereoSet biased knowledge pair
- src/biaslab/data/biascope/crows_transfer.jsonl CrowS-Pairs as cross-dataset pairs (evaluation only)
- src/biaslab/data/biascope/build_stats.json     counts, skipped pairs by reason, sha256 of the outputs

The commonsense retention set (commonsense_retention.jsonl) is hand-written and NOT produced here.
The vendored paraphrases.jsonl predates swap_group's article fix: a rebuild today changes 16 rows ("an european"
-> "a european"), which changes BiaScope's PS inputs, so it goes with a new PS protocol id (biascope.PS_PROTOCOL).
Run: .venv/bin/python experiments/fast/build_biascope.py
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from biaslab.data import DATA_ROOT, sha256_file
from biaslab.methods.fast.eval_pairs import crows_pairs, paraphrase_pair
from biaslab.methods.fast.pairs import build_stereoset_pairs
from biaslab.runs import atomic_write_json, atomic_write_text

OUT = DATA_ROOT / "biascope"


def main() -> None:
    pairs, skipped = build_stereoset_pairs()
    para = [row for p in pairs for row in paraphrase_pair(p)]
    atomic_write_text(OUT / "paraphrases.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in para))
    crows, crows_skipped = crows_pairs()
    atomic_write_text(OUT / "crows_transfer.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in crows))
    stats = {
        "stereoset_pairs": dict(Counter(p.bias_type for p in pairs)), "stereoset_skipped": skipped,
        "paraphrase_rows": len(para), "paraphrase_variants": dict(Counter(r["variant"] for r in para)),
        "crows_pairs": dict(Counter(r["bias_type"] for r in crows)), "crows_skipped": crows_skipped,
        "sha256": {f: sha256_file(OUT / f) for f in ("paraphrases.jsonl", "crows_transfer.jsonl",
                                                      "commonsense_retention.jsonl")},
    }
    atomic_write_json(OUT / "build_stats.json", stats)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
