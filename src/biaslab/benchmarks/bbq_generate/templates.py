"""Reading and checking the BBQ authors' template and vocabulary files (nyu-mll/BBQ ``templates/``, CC BY 4.0).

Every cell stays a string, as the authors' generator reads the templates (``na_filter=False``); a malformed slot, a
list that does not parse or a vocabulary category the category file does not know is a
:class:`~biaslab.errors.DataError` naming the file, the template's first line and the field.
"""
from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DataError

SINGLE = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
          "Religion", "SES", "Sexual_orientation")
INTERSECTIONAL = ("Race_x_SES", "Race_x_gender")
CATEGORIES = SINGLE + INTERSECTIONAL
# the authors' paraphrases of the UNKNOWN answer, in their order (one is drawn per example set)
UNKNOWN_OPTIONS = ("Unknown", "Cannot be determined", "Can't be determined", "Not answerable", "Not known",
                   "Not enough info", "Not enough information", "Cannot answer", "Can't answer", "Undetermined")
SLOT = re.compile(r"\{\{([A-Z0-9_]+)\}\}")
KNOWN_SLOTS = {"NAME1", "NAME2", "WORD1", "WORD2", "GEN1", "GEN2", "OCC1", "OCC2"}
TEXT_FIELDS = ("Ambiguous_Context", "Disambiguating_Context", "Question_negative_stereotype", "Question_non_negative",
               "Answer_negative", "Answer_non_negative")
_COMMON = ("Q_id", "Category", "Ambiguous_Context", "Disambiguating_Context", "Lexical_diversity",
           "Question_negative_stereotype", "Question_non_negative", "Answer_negative", "Answer_non_negative",
           "Notes")
# Stray braces in the authors' own templates, left in the text as their generator leaves them (e.g. upstream
# Nationality rows read "the {Mozambican man"): (category, Q_id, version, column) → the malformed fragment.
KNOWN_DEFECTS = {
    ("Disability_status", "19", "b", "Disambiguating_Context"): "{[NAME1}}",
    ("Nationality", "23", "", "Disambiguating_Context"): "{{{NAME2}}",
    ("Race_x_SES", "7", "", "Disambiguating_Context"): "{{OCC2}}}",
}
REQUIRED = {"single": _COMMON + ("Known_stereotyped_groups",),
            "intersectional": _COMMON + ("Names", "Proper_nouns_only", "Known_stereotyped_race",
                                         "Known_stereotyped_var2", "Var2_info")}


@dataclass
class Template:
    """One template row (a template id and version), every cell a string; ``line`` is its first line."""
    cells: dict[str, str]
    path: Path
    line: int
    columns: tuple[str, ...] = field(default_factory=tuple)

    def __getitem__(self, key: str) -> str:
        return self.cells.get(key, "")

    def has(self, column: str) -> bool:
        return column in self.columns

    def error(self, column: str | None, problem: str) -> DataError:
        return DataError(self.path, self.line, column, problem)

    def literal_list(self, column: str, nested: bool = False) -> list:
        """A cell holding a Python/JSON list of strings, e.g. ``["old"]`` (``nested``: items may also be lists of
        strings, e.g. ``[["poor", "low-income"], ["rich"]]``)."""
        raw = self[column]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise self.error(column, f"expected a list such as [\"a\", \"b\"], got {raw!r}") from None
        def ok(v):
            return isinstance(v, str) or (nested and isinstance(v, list) and v and all(isinstance(x, str) for x in v))

        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise self.error(column, f"expected a list of strings, got {raw!r}")
        return value


def _read(path: Path) -> tuple[list[dict], list[int], tuple[str, ...]]:
    if not path.is_file():
        raise DataError(path, None, None, "template file is missing")
    rows, lines = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            if None in row:
                raise DataError(path, start, None, f"has more columns than the header ({len(reader.fieldnames)})")
            rows.append({k: (v if v is not None else "") for k, v in row.items()})
            lines.append(start)
            start = reader.line_num + 1
        columns = tuple(reader.fieldnames or ())
    return rows, lines, columns


def read_templates(path: Path, kind: str) -> list[Template]:
    """The template rows that have an ambiguous context (the authors skip the others), checked."""
    rows, lines, columns = _read(path)
    missing = [c for c in REQUIRED[kind] if c not in columns]
    if missing:
        raise DataError(path, 1, missing[0], f"the template header lacks column {missing[0]!r} "
                        f"(a {kind} BBQ template needs {', '.join(REQUIRED[kind])})")
    out = []
    for row, line in zip(rows, lines):
        if row.get("Ambiguous_Context", "") == "":
            continue
        t = Template(row, path, line, columns)
        if not t["Q_id"].strip().isdigit():
            raise t.error("Q_id", f"expected a template number, got {t['Q_id']!r}")
        for col in TEXT_FIELDS:
            check_slots(t, col)
        out.append(t)
    return out


def check_slots(t: Template, column: str) -> None:
    """Every ``{{…}}`` is a known slot and no brace is left unpaired."""
    text = t[column]
    known = KNOWN_DEFECTS.get((t.path.stem, t["Q_id"], t["version"], column))
    if known is not None and known in text:
        text = text.replace(known, "")
    for name in SLOT.findall(text):
        if name not in KNOWN_SLOTS:
            raise t.error(column, f"unknown slot {{{{{name}}}}} (known: {', '.join(sorted(KNOWN_SLOTS))})")
    rest = SLOT.sub("", text)
    if "{" in rest or "}" in rest:
        bad = re.search(r"\{+[^{}]*\}*|\}+", rest).group(0)
        raise t.error(column, f"malformed slot {bad!r}: slots are written {{{{NAME1}}}}, {{{{WORD1}}}}, …")


def slot_lists(t: Template, column: str, first: str, second: str) -> tuple[list[str], list[str]]:
    """``"NAME1: [a, b]; NAME2: [c, d]"`` → ``([a, b], [c, d])``.

    Follows the authors' parser on one quirk that changes how many items a template yields: a segment after the
    ``second`` one resets its list, so ``second`` must be the last segment (and is empty when absent)."""
    raw = t[column]
    one: list[str] | None = None
    two: list[str] = []
    for seg in raw.split(";"):
        body = seg
        for label in (first, second):
            body = body.replace(f"{label}:", "").replace(f"{{{{{label}}}}}:", "")
        words = [w.strip() for w in body.strip().replace("[", "").replace("]", "").split(",")]
        if first in seg:
            one = words
        two = words if second in seg else []
    if one is None:
        raise t.error(column, f"expected '{first}: [word, word]; {second}: [word, word]', got {raw!r}")
    return one, two


@dataclass
class Vocabulary:
    """``vocabulary.csv`` (group words) and ``vocabulary_proper_names.csv`` (first/last names with tags)."""
    words: list[dict]
    names: list[dict]

    def category(self, cat: str) -> list[dict]:
        return [w for w in self.words if w["Category"] == cat]

    def info(self, name: str) -> str:
        """The first vocabulary row's Info for this word (across categories, as the authors look it up)."""
        for w in self.words:
            if w["Name"] == name:
                return w["Info"]
        raise KeyError(name)


def unique(values) -> list[str]:
    """First-occurrence order, like pandas' ``unique``."""
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def read_vocabulary(root: Path) -> Vocabulary:
    words_path, names_path = root / "vocabulary.csv", root / "vocabulary_proper_names.csv"
    w_rows, w_lines, w_cols = _read(words_path)
    for col in ("Category", "Pilot_include", "SubCat", "Name", "Info"):
        if col not in w_cols:
            raise DataError(words_path, 1, col, f"the vocabulary header lacks column {col!r}")
    known = set(CATEGORIES)
    for row, line in zip(w_rows, w_lines):
        if row["Category"] not in known:
            raise DataError(words_path, line, "Category", f"unknown vocabulary category {row['Category']!r} "
                            f"(expected one of {', '.join(CATEGORIES)})")
        if not row["Name"].strip():
            raise DataError(words_path, line, "Name", "empty vocabulary word")
    n_rows, n_lines, n_cols = _read(names_path)
    for col in ("Name", "First_last", "gender", "ethnicity"):
        if col not in n_cols:
            raise DataError(names_path, 1, col, f"the names header lacks column {col!r}")
    for row, line in zip(n_rows, n_lines):
        if row["First_last"] not in ("first", "first_only", "last"):
            raise DataError(names_path, line, "First_last", f"expected first, first_only or last, got {row['First_last']!r}")
    return Vocabulary([r for r in w_rows if r["Pilot_include"] != "No"], n_rows)
