"""WinoBias (Zhao et al. 2018, NAACL; https://aclanthology.org/N18-2003/): occupation–pronoun coreference, pro- vs
anti-stereotypical, type 1 (world knowledge needed) and type 2 (syntax resolves it).

Each sentence brackets the gold occupation mention and the pronoun(s) that corefer with it. biaslab asks which
occupation the (first bracketed) pronoun refers to, with two options: the two occupations of the sentence, in
their order of appearance for a fixed pseudo-random half of the sentences and reversed for the other half
(:func:`reverse_order`), so the gold is option A about as often as B (a letter-position preference then shows in
accuracy as noise, not as a signal; pro and anti share each sentence's order). The other occupation is found with the
vendored occupation lists; a row where exactly one other listed occupation cannot be found is skipped and counted
(``extra.skipped_rows``; 0 in the test split, 2 in dev). Scored as a 2-option :class:`~biaslab.tasks.MCItem`
through :func:`biaslab.tasks.score_mc` under one fixed instruction (``instruction`` option, default 0).

Deviations: the paper evaluates coreference systems by F1 on the full sentence; this is a two-option question to
an LM, scored by accuracy. Text clean-up of two source quirks: a doubled article (``the [the chief]``) and a
detached possessive (``farmer 's``) are normalised in the context shown to the model.
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from ..data import DATA_ROOT
from ..errors import BiaslabError, DataError, UnknownNameError
from ..metrics import winobias as M
from ..tasks import INSTRUCTIONS, MCItem, score_mc
from .base import Benchmark, MetricDef, Protocol, prediction_tie_share

TYPES = ("type1", "type2")
STEREOTYPES = ("pro", "anti")
SPLITS = ("dev", "test")
FEMALE_PRONOUNS = frozenset({"she", "her", "hers", "herself"})
MALE_PRONOUNS = frozenset({"he", "him", "his", "himself"})
PRONOUNS = FEMALE_PRONOUNS | MALE_PRONOUNS
_LINE = re.compile(r"^(\d+) (.+)$")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _data_dir(data_dir) -> Path:
    return Path(data_dir) if data_dir is not None else DATA_ROOT / "winobias"


def read_occupations(data_dir=None) -> dict[str, str]:
    """occupation (as listed, e.g. "CEO", "construction worker") → "female"/"male" (BLS majority)."""
    root = _data_dir(data_dir)
    out: dict[str, str] = {}
    for gender in ("female", "male"):
        path = root / f"{gender}_occupations.txt"
        if not path.exists():
            raise DataError(path, None, None, "WinoBias occupation list is missing (reinstall biaslab)")
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            occ = raw.strip()
            if not occ:
                continue
            if occ.lower() in {o.lower() for o in out}:
                raise DataError(path, n, None, f"occupation {occ!r} is listed twice")
            out[occ] = gender
    if not out:
        raise DataError(root, None, None, "the occupation lists are empty")
    return out


def _occupation_regex(occupations) -> re.Pattern:
    alts = sorted(occupations, key=len, reverse=True)  # longest first: "construction worker" before any prefix
    return re.compile(r"\b(" + "|".join(re.escape(o) for o in alts) + r")s?\b", re.IGNORECASE)


def clean_context(text: str) -> str:
    """Normalise two source quirks: doubled article ("the the chief") and detached possessive ("farmer 's")."""
    text = re.sub(r"\b(the|a|an) \1\b", r"\1", text, flags=re.IGNORECASE)
    text = re.sub(r" 's\b", "'s", text)
    return re.sub(r"\s+", " ", text).strip()


def reverse_order(typ: str, num: str) -> bool:
    """Whether sentence ``num`` of ``typ`` lists its options in reverse order of appearance: a fixed pseudo-random
    half (sha256 parity), so the gold sits at A and at B about equally often — in type 2 the gold is always the
    second mention — and the pro and anti versions of a sentence share the order (the gap stays position-free)."""
    return hashlib.sha256(f"winobias-{typ}-{num}".encode()).digest()[0] % 2 == 1


class Skip(Exception):
    """A well-formed row that cannot be posed as a two-option question (counted, not fatal)."""


def parse_sentence(sentence: str, occupations: dict[str, str], *, path="<sentence>", line: int | None = None,
                   reverse: bool = False) -> dict:
    """Parse one bracketed WinoBias sentence (without its leading number).

    Returns ``{"context", "pronoun", "options" (2, in order of appearance, or reversed with ``reverse``), "gold"
    (index), "gold_occupation", "other_occupation"}``. Raises DataError for malformed brackets, Skip when the two occupations cannot be
    identified from the lists."""
    spans = list(_BRACKET.finditer(sentence))
    plain_parts, pos, plain_len, inner = [], 0, 0, []
    for m in spans:
        plain_parts.append(sentence[pos:m.start()])
        plain_len += m.start() - pos
        inner.append((m.group(1), plain_len, plain_len + len(m.group(1))))
        plain_parts.append(m.group(1))
        plain_len += len(m.group(1))
        pos = m.end()
    plain_parts.append(sentence[pos:])
    plain = "".join(plain_parts)
    if "[" in plain or "]" in plain:
        raise DataError(path, line, "sentence", "unbalanced or nested square brackets")
    prons = [s for s in inner if s[0].strip().lower() in PRONOUNS]
    ments = [s for s in inner if s[0].strip().lower() not in PRONOUNS]
    if len(ments) != 1 or not prons:
        raise DataError(path, line, "sentence", "expected one bracketed occupation mention and at least one bracketed "
                        f"pronoun, found mentions {[m[0] for m in ments]} and pronouns {[p[0] for p in prons]}")
    ment_text, m_start, m_end = ments[0]
    rx = _occupation_regex(occupations)
    canon = {o.lower(): o for o in occupations}
    gold_occ = {canon[m.group(1).lower()] for m in rx.finditer(ment_text)}
    if len(gold_occ) != 1:
        raise Skip(f"the bracketed mention {ment_text.strip()!r} names {len(gold_occ)} listed occupations")
    gold = gold_occ.pop()
    others: dict[str, int] = {}
    for m in rx.finditer(plain):
        if m_start <= m.start() < m_end:
            continue
        occ = canon[m.group(1).lower()]
        if occ != gold:
            others.setdefault(occ, m.start())
    if len(others) != 1:
        raise Skip(f"expected exactly one other listed occupation, found {sorted(others) or 'none'}")
    other, o_start = next(iter(others.items()))
    gold_first = (m_start < o_start) != reverse
    options = (f"the {gold}", f"the {other}") if gold_first else (f"the {other}", f"the {gold}")
    return {"context": clean_context(plain), "pronoun": prons[0][0].strip(), "options": options,
            "gold": 0 if gold_first else 1, "gold_occupation": gold, "other_occupation": other}


def _load(split: str, data_dir: str | None) -> tuple[tuple[MCItem, ...], tuple[dict, ...]]:
    root = _data_dir(data_dir)
    occupations = read_occupations(data_dir)
    items: list[MCItem] = []
    skipped: list[dict] = []
    for typ in TYPES:
        for st in STEREOTYPES:
            path = root / f"{st}_stereotyped_{typ}.txt.{split}"
            if not path.exists():
                raise DataError(path, None, None, "WinoBias file is missing (reinstall biaslab)")
            seen: set[str] = set()
            for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not raw.strip():
                    continue
                m = _LINE.match(raw.strip())
                if not m:
                    raise DataError(path, n, "line", "expected '<number> <sentence>'")
                num = m.group(1)
                if num in seen:
                    raise DataError(path, n, "line", f"duplicate sentence number {num}")
                seen.add(num)
                try:
                    p = parse_sentence(m.group(2), occupations, path=path, line=n, reverse=reverse_order(typ, num))
                except Skip as e:
                    skipped.append({"file": path.name, "line": n, "reason": str(e)})
                    continue
                pron = p["pronoun"].lower()
                items.append(MCItem(
                    id=f"winobias-{split}-{typ}-{st}-{num}", options=p["options"], gold=p["gold"],
                    context=p["context"], question=f'Who does "{p["pronoun"]}" refer to?',
                    meta={"group": typ, "type": typ, "stereotype": st, "pair": f"{typ}-{num}",
                          "gold_occupation": p["gold_occupation"], "other_occupation": p["other_occupation"],
                          "occupation_gender": occupations[p["gold_occupation"]],
                          "pronoun_gender": "female" if pron in FEMALE_PRONOUNS else "male"}))
    return tuple(items), tuple(skipped)


_load_vendored = functools.lru_cache(maxsize=4)(_load)


def load_winobias_items(split: str = "test", *, data_dir: str | Path | None = None) -> tuple[list[MCItem], list[dict]]:
    """(items, skipped rows) of a split; the vendored data is parsed once and cached, a ``data_dir`` (tests) replacing
    the vendored folder is read afresh on every call."""
    if split not in SPLITS:
        raise UnknownNameError("WinoBias split", split, SPLITS)
    items, skipped = _load_vendored(split, None) if data_dir is None else _load(split, str(data_dir))
    return list(items), [dict(s) for s in skipped]


class WinoBias(Benchmark):
    name = "winobias"
    description = "WinoBias (Zhao et al. 2018): which occupation does the pronoun refer to; accuracy pro/anti and gap, per type"
    protocols = (
        Protocol("letter", "winobias.letter.v2", "the two occupations listed as A/B (order of appearance); argmax of "
                 "the next-token log-probability of the letters, one fixed instruction"),
        Protocol("option-loglik", "winobias.option-loglik.v2", "argmax of the summed log-likelihood of each "
                 "occupation's text (\"the <occupation>\") as the answer"),
        Protocol("generate", "winobias.generate.v1", "the two occupations listed as A/B; a greedy answer of at most "
                 "16 tokens, cut at the first line break and matched to an option (its letter or its normalised "
                 "text); an answer naming neither is left out and counted in unmatched_rate"),
    )
    default_protocol = "letter"
    group_field = "type"
    coverage = ("complete: the 1,584 sentences of one split (option split, default test) of the 3,168 (types 1 and 2, pro and anti)")
    strata = ("type", "stereotype")
    data_files = tuple(f"winobias/{s}_stereotyped_{t}.txt.{sp}" for t in TYPES for s in STEREOTYPES for sp in SPLITS) + (
        "winobias/female_occupations.txt", "winobias/male_occupations.txt")
    options = {"split": "test", "instruction": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["split"] not in SPLITS:
            raise UnknownNameError("WinoBias split", self.opts["split"], SPLITS)
        i = self.opts["instruction"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(INSTRUCTIONS):
            raise BiaslabError(f"winobias option 'instruction' must be an instruction index 0-{len(INSTRUCTIONS) - 1}, got {i!r}")

    def load_items(self) -> list[dict]:
        items, _ = load_winobias_items(self.opts["split"])
        return [{"id": it.id, **it.meta, "item": it} for it in items]

    def score(self, lm, items: list[dict], *, protocol: Protocol) -> list[dict]:
        return score_mc(lm, [d["item"] for d in items], [self.opts["instruction"]], protocol=protocol.name,
                        desc="winobias")

    def metric_defs(self, protocol: Protocol) -> list[MetricDef]:
        return [
            MetricDef("accuracy_pro", M.accuracy_pro, "accuracy on pro-stereotyped sentences", ideal=1.0),
            MetricDef("accuracy_anti", M.accuracy_anti, "accuracy on anti-stereotyped sentences", ideal=1.0),
            MetricDef("gap", M.gap, "accuracy_pro − accuracy_anti (fraction; 0 ideal)", scale="fraction -1-1", ideal=0.0),
        ] + ([MetricDef("unmatched_rate", M.unmatched_rate, "share of generated answers that named neither occupation "
                        "(left out of the accuracies)", ideal=0.0, headline=False)] if protocol.name == "generate" else [])

    def extra_results(self, records: list[dict], protocol: Protocol) -> dict:
        _, skipped = load_winobias_items(self.opts["split"])
        n = len(records)
        return {"split": self.opts["split"], "instruction": self.opts["instruction"], "skipped_rows": len(skipped),
                "skipped": skipped, "prediction_first_option_share": sum(r["pred"] == 0 for r in records) / n if n else None,
                "prediction_tie_share": prediction_tie_share(records), "unmatched": sum(r["pred"] is None for r in records)}
