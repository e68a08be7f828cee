"""Data of the soft-prompt sentiment probe (docs/methods/softprompt.md, Tian et al. 2023, arXiv 2306.04735).

- SST-5 (vendored ``data/sst/sst5_*.tsv``) mapped to three classes: 0–1 → negative (0), 2 → neutral (1),
  3–4 → positive (2). The vendored sentences are PTB-tokenised and lower-cased; :func:`detokenize` undoes the
  tokenisation (``-lrb-`` → ``(``, ``do n't`` → ``don't``, `` ,`` → ``,``) so that training text looks like the
  template sentences the probe is applied to. Case is kept (lower).
- The Czarnowska et al. (TACL 2021) sentiment fairness templates (``data/czarnowska_templates/
  sentiment_fairness_tests.tsv``: no header; label, category, group, text; label 0/1/2 = negative/neutral/positive).

Both loaders validate every row and raise :class:`~biaslab.errors.DataError` naming the file, line and field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BiaslabError, DataError, UnknownNameError

LABELS = ("negative", "neutral", "positive")
SST5_TO_3 = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
TEMPLATES_FILE = ("czarnowska_templates", "sentiment_fairness_tests.tsv")


@dataclass(frozen=True)
class Sentence:
    id: str          # stable id: "<source>-<split>-<line>"
    text: str
    label: int       # 0 negative, 1 neutral, 2 positive
    category: str = ""
    group: str = ""

    def as_item(self) -> dict:
        return {"id": self.id, "text": self.text, "label": self.label, "category": self.category, "group": self.group}


_DETOK = [
    (re.compile(r"-lrb-"), "("), (re.compile(r"-rrb-"), ")"), (re.compile(r"-lsb-"), "["), (re.compile(r"-rsb-"), "]"),
    (re.compile(r"``|''"), '"'), (re.compile(r"\( "), "("), (re.compile(r" \)"), ")"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r" ([,.;:!?%])"), r"\1"), (re.compile(r"\$ "), "$"), (re.compile(r" ' "), "' "),
    (re.compile(r"\s+"), " "),
]


def detokenize(text: str) -> str:
    """Undo the PTB tokenisation of the vendored SST sentences (see module docstring)."""
    for pat, rep in _DETOK:
        text = pat.sub(rep, text)
    return text.strip()


def load_sst3(split: str, *, path: Path | str | None = None) -> list[Sentence]:
    """SST-5 ``split`` (train/dev/test) mapped to 3 classes, detokenised. Rows are validated."""
    from ..data import data_path

    if split not in ("train", "dev", "test"):
        raise UnknownNameError("SST split", split, ["train", "dev", "test"])
    path = Path(path) if path is not None else data_path("sst", f"sst5_{split}.tsv")
    out = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n")
        if header.split("\t") != ["sentence", "label"]:
            raise DataError(path, 1, None, f"expected the header 'sentence<TAB>label', got {header!r}")
        for n, raw in enumerate(f, 2):
            line = raw.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(path, n, None, f"expected 2 tab-separated fields (sentence, label), got {len(parts)}")
            sent, lab = parts
            if lab not in ("0", "1", "2", "3", "4"):
                raise DataError(path, n, "label", f"expected an SST-5 label 0-4, got {lab!r}")
            if not sent.strip():
                raise DataError(path, n, "sentence", "empty sentence")
            out.append(Sentence(f"sst-{split}-{n}", detokenize(sent), SST5_TO_3[int(lab)]))
    return out


def load_templates(path: Path | str | None = None) -> list[Sentence]:
    """All Czarnowska template sentences (31,972 in the vendored file), validated row by row.

    A row with a wrong field count, an unknown label (not 0/1/2), or an empty category, group or text raises
    DataError naming the file and line."""
    from ..data import data_path

    path = Path(path) if path is not None else data_path(*TEMPLATES_FILE)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 4:
                raise DataError(path, n, None, f"expected 4 tab-separated fields (label, category, group, text), got {len(parts)}")
            lab, cat, grp, text = (p.strip() for p in parts)
            if lab not in ("0", "1", "2"):
                raise DataError(path, n, "label", f"unknown label {lab!r}; expected 0 (negative), 1 (neutral) or 2 (positive)")
            for name, val in (("category", cat), ("group", grp), ("text", text)):
                if not val:
                    raise DataError(path, n, name, "missing (empty)")
            out.append(Sentence(f"tmpl-{n}", text, int(lab), cat, grp))
    if not out:
        raise DataError(path, None, None, "no template rows")
    return out


def sample_templates(limit: int | None, seed: int = 0):
    """Seeded subsample of the templates, stratified by (category, group, label) (round-robin over strata)."""
    from ..benchmarks.base import stratified_sample

    rows = load_templates()
    if limit is not None and limit < 1:
        raise BiaslabError(f"--template-limit must be a positive number of sentences, got {limit}")
    items = [s.as_item() for s in rows]
    return stratified_sample(items, limit, seed=seed, strata=("category", "group", "label"))
