"""SR_LLM data: biased → neutral rewrite pairs from ``biaslab/data/debias_rewrites/`` in one schema, split
train / validation / test with a seed, with no test (or validation) sentence in training.

Sources (see the data README for provenance and licenses):

- ``wnc``: the official Wiki Neutrality Corpus sample (Pryzant et al. 2020), ``pre.*`` ↔ ``post.*`` line pairs;
  dimension ``subjective`` (framing / epistemological bias).
- ``wnc_chat``: the WNC-derived chat set (Lou 2024); only rows whose answer holds a neutralised rewrite are
  pairs. Rows answered "does not contain detectable subjective bias" have no biased side and are skipped.
- ``winobias_plus``, ``reddit``, ``opensubtitles``: gendered → gender-neutral (singular *they*) rewrites
  (Vanmassenhove et al. 2021); dimension ``gender``.

Differences from SR_LLM (Raza et al. 2024), whose own data was never released: these public pairs replace it;
upstream train/test files are pooled and re-split with a seed (the paper's code split unseeded). Pairs whose two
sides are the same after normalisation teach nothing and are dropped (counted in :func:`data_stats`).

Leakage control: pairs are grouped by their normalised biased *and* neutral sentences (union-find), and whole
groups go to one split, so e.g. WinoBias+'s "he"/"she" variants that share one neutral reference never straddle
train and test. Normalisation lower-cases and keeps only word characters, so WNC's tokenised text ("kgb ' s")
and raw text ("kgb's") of the same sentence collide as they should.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ...data import DATA_ROOT
from ...errors import BiaslabError, DataError

DATA_DIR = "debias_rewrites"
SOURCES = ("wnc", "wnc_chat", "winobias_plus", "reddit", "opensubtitles")
SPLITS = ("train", "validation", "test")
_CHAT_PREFIX = "This is subjective bias text. The neutralized text is:"
_CHAT_NOT_BIASED = "This text does not contain detectable subjective bias."


@dataclass(frozen=True)
class RewritePair:
    id: str          # "<source>:<file stem>:<line>"
    source: str      # one of SOURCES
    biased: str
    neutral: str
    dimension: str   # "subjective" | "gender"

    def to_dict(self) -> dict:
        return asdict(self)


def norm_key(text: str) -> str:
    """Whitespace-, case- and punctuation-insensitive key used for de-duplication across splits."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _clean(text: str) -> str:
    return " ".join(text.split())


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "vendored data file is missing (reinstall biaslab)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, data[:e.start].count(b"\n") + 1, None, "not valid UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _parallel(root: Path, source: str, src_file: str, ref_file: str, dimension: str) -> list[RewritePair]:
    """Line i of ``src_file`` ↔ line i of ``ref_file``; an empty line on either side is a corrupt row."""
    sp, rp = root / src_file, root / ref_file
    src, ref = _read_lines(sp), _read_lines(rp)
    if len(src) != len(ref):
        short = sp if len(src) < len(ref) else rp
        raise DataError(short, min(len(src), len(ref)) + 1, None,
                        f"parallel files differ in length ({sp.name}: {len(src)} lines, {rp.name}: {len(ref)} lines)")
    stem = Path(src_file).name.split(".")[0] + ("." + Path(src_file).name.split(".")[1] if source == "wnc" else "")
    pairs = []
    for n, (b, r) in enumerate(zip(src, ref), 1):
        if not b.strip():
            raise DataError(sp, n, "biased", "empty line (expected a sentence paired with line "
                            f"{n} of {rp.name})")
        if not r.strip():
            raise DataError(rp, n, "neutral", f"empty line (expected the rewrite of line {n} of {sp.name})")
        pairs.append(RewritePair(f"{source}:{stem}:{n}", source, _clean(b), _clean(r), dimension))
    return pairs


def _chat(root: Path, file: str) -> list[RewritePair]:
    path = root / file
    pairs = []
    for n, raw in enumerate(_read_lines(path), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(path, n, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list):
            raise DataError(path, n, "messages", "expected a list of {role, content} messages")
        by_role = {}
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise DataError(path, n, "messages", "each message needs a 'role' and a string 'content'")
            by_role[m["role"]] = m["content"]
        for role in ("user", "assistant"):
            if not by_role.get(role, "").strip():
                raise DataError(path, n, f"messages[{role}]", "missing or empty")
        answer = by_role["assistant"].strip()
        if answer.startswith(_CHAT_NOT_BIASED):
            continue
        if not answer.startswith(_CHAT_PREFIX):
            raise DataError(path, n, "messages[assistant]",
                            f"expected {_CHAT_PREFIX!r} <rewrite> or {_CHAT_NOT_BIASED!r}, got {answer[:60]!r}")
        neutral = answer[len(_CHAT_PREFIX):].strip()
        if not neutral:
            raise DataError(path, n, "messages[assistant]", "the neutralised rewrite is empty")
        stem = Path(file).stem.replace("fine_tuning_", "").replace("_data", "")
        pairs.append(RewritePair(f"wnc_chat:{stem}:{n}", "wnc_chat", _clean(by_role["user"]), _clean(neutral),
                                 "subjective"))
    return pairs


def load_pairs(root: Path | None = None, *, sources=SOURCES) -> list[RewritePair]:
    """Every pair of the chosen sources, in file order (before de-duplication and splitting)."""
    root = Path(root) if root is not None else DATA_ROOT / DATA_DIR
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        from ...errors import UnknownNameError

        raise UnknownNameError("rewrite data source", unknown[0], SOURCES)
    pairs: list[RewritePair] = []
    for s in sources:
        if s == "wnc":
            for part in ("train", "test"):
                pairs += _parallel(root, "wnc", f"wnc_pryzant_sample/pre.{part}.txt",
                                   f"wnc_pryzant_sample/post.{part}.txt", "subjective")
        elif s == "wnc_chat":
            for part in ("train", "test"):
                pairs += _chat(root, f"wnc_chat_lou/fine_tuning_{part}_data.jsonl")
        elif s == "winobias_plus":
            pairs += _parallel(root, s, "winobias_plus/WinoBias+.preprocessed.txt",
                               "winobias_plus/WinoBias+.references.txt", "gender")
        elif s == "reddit":
            pairs += _parallel(root, s, "winobias_plus/Reddit.orig.txt", "winobias_plus/Reddit.references.txt", "gender")
        elif s == "opensubtitles":
            pairs += _parallel(root, s, "winobias_plus/OpenSubtitles.orig.txt",
                               "winobias_plus/OpenSubtitles.references.txt", "gender")
    return pairs


def dedupe(pairs: list[RewritePair]) -> tuple[list[RewritePair], Counter]:
    """Drop no-op pairs (biased == neutral after normalisation) and exact duplicate pairs (first kept)."""
    seen, out, dropped = set(), [], Counter()
    for p in pairs:
        kb, kn = norm_key(p.biased), norm_key(p.neutral)
        if kb == kn:
            dropped["no_change"] += 1
            continue
        if (kb, kn) in seen:
            dropped["duplicate_pair"] += 1
            continue
        seen.add((kb, kn))
        out.append(p)
    return out, dropped


def _groups(pairs: list[RewritePair]) -> list[list[int]]:
    """Connected components of pairs sharing a normalised biased or neutral sentence."""
    parent = list(range(len(pairs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for k in (norm_key(p.biased), norm_key(p.neutral)):
            if k in first:
                a, b = find(i), find(first[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[k] = i
    comps: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pairs)):
        comps[find(i)].append(i)
    return [comps[k] for k in sorted(comps)]


def split_pairs(pairs: list[RewritePair], *, seed: int = 0, validation: float = 0.1,
                test: float = 0.15) -> dict[str, list[RewritePair]]:
    """Seeded, leakage-free split: whole groups (see module doc) are assigned to splits, per source, so each
    source is represented in every split in about the requested proportions."""
    if not (0 <= validation < 1 and 0 < test < 1 and validation + test < 1):
        raise BiaslabError(f"split fractions must satisfy 0 <= validation, 0 < test, validation + test < 1; "
                           f"got validation={validation}, test={test}")
    groups = _groups(pairs)
    by_source: dict[str, list[list[int]]] = defaultdict(list)
    for g in groups:  # a group is filed under the source of its first pair
        by_source[pairs[g[0]].source].append(g)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for src in sorted(by_source):
        gs = by_source[src]
        rng = random.Random(f"{seed}:{src}")
        rng.shuffle(gs)
        total = sum(len(g) for g in gs)
        n_test, n_val = round(total * test), round(total * validation)
        taken = 0
        for g in gs:
            if taken < n_test:
                out["test"] += g
            elif taken < n_test + n_val:
                out["validation"] += g
            else:
                out["train"] += g
            taken += len(g)
    return {s: [pairs[i] for i in sorted(ix)] for s, ix in out.items()}


def load_splits(*, seed: int = 0, validation: float = 0.1, test: float = 0.15, sources=SOURCES,
                root: Path | None = None) -> dict[str, list[RewritePair]]:
    """The de-duplicated, seeded train / validation / test splits (lists of :class:`RewritePair`)."""
    pairs, _ = dedupe(load_pairs(root, sources=sources))
    splits = split_pairs(pairs, seed=seed, validation=validation, test=test)
    check_no_leak(splits)
    return splits


MIN_USER_PAIRS = 10   # a test pair, a validation pair and training pairs at the default 75/10/15 split


def load_user_pairs(path) -> tuple[str, list[RewritePair]]:
    """Rewrite pairs of your own (``--task pairs:PATH``), JSON Lines: ``biased`` and ``neutral`` (strings),
    optional ``id`` (default ``<file stem>-<line>``), ``source`` (a stratum for sampling and splitting; default
    ``user``) and ``dimension`` (default ``subjective``). Returns (``pairs:<file name>@<first 12 hex digits of its
    sha256>``, pairs): the name changes with the content, so a cached fit of an edited file is never reused.
    Errors name the file, line and field. The pairs come de-duplicated (:func:`dedupe`)."""
    from ...data import read_jsonl, sha256_file

    path = Path(path)
    if path.is_dir():
        raise DataError(path, None, None, "is a directory; --task pairs:PATH takes one JSON Lines file")
    if not path.is_file():
        raise DataError(path, None, None, "pair file not found (expected JSON Lines of {\"biased\", \"neutral\"}: "
                        "--task pairs:PATH)")
    pairs, seen = [], {}
    for row in read_jsonl(path):
        n = row["_line"]
        for f in ("biased", "neutral"):
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise DataError(path, n, f, "expected a non-empty string (each line pairs a biased sentence with "
                                "its neutral rewrite)")
        extra = {}
        for f, default in (("id", f"{path.stem}-{n}"), ("source", "user"), ("dimension", "subjective")):
            v = row.get(f, default)
            if not isinstance(v, str) or not v.strip():
                raise DataError(path, n, f, f"expected a non-empty string, got {v!r}")
            extra[f] = v.strip()
        if extra["id"] in seen:
            raise DataError(path, n, "id", f"{extra['id']!r} repeats the id of line {seen[extra['id']]}")
        seen[extra["id"]] = n
        pairs.append(RewritePair(extra["id"], extra["source"], _clean(row["biased"]), _clean(row["neutral"]),
                                 extra["dimension"]))
    kept, dropped = dedupe(pairs)
    if len(kept) < MIN_USER_PAIRS:
        why = f" ({', '.join(f'{v} {k}' for k, v in sorted(dropped.items()))} dropped)" if dropped else ""
        raise DataError(path, None, None, f"{len(kept)} distinct pairs{why}; SR_LLM splits a pair file into train, "
                        f"validation and test and needs at least {MIN_USER_PAIRS}")
    return f"pairs:{path.name}@{sha256_file(path)[:12]}", kept


def split_user_pairs(pairs: list[RewritePair], *, seed: int = 0) -> dict[str, list[RewritePair]]:
    """The seeded, leakage-free splits of a user's (de-duplicated) pairs, as :func:`load_splits`."""
    splits = split_pairs(pairs, seed=seed)
    for s in ("train", "test"):
        if not splits[s]:
            raise BiaslabError(f"the pair file's {s} split is empty: its pairs share sentences so that they form "
                               "too few groups to split (a group never straddles two splits); add more distinct pairs")
    check_no_leak(splits)
    return splits


def check_no_leak(splits: dict[str, list[RewritePair]]) -> None:
    """Raise if any normalised sentence of validation/test also occurs in train (either side)."""
    train = {norm_key(t) for p in splits["train"] for t in (p.biased, p.neutral)}
    for s in ("validation", "test"):
        for p in splits[s]:
            for t in (p.biased, p.neutral):
                if norm_key(t) in train:
                    raise BiaslabError(f"split leak: {s} pair {p.id} shares the sentence {t[:60]!r} with train")


def data_stats(*, seed: int = 0, validation: float = 0.1, test: float = 0.15, sources=SOURCES) -> dict:
    raw = load_pairs(sources=sources)
    pairs, dropped = dedupe(raw)
    splits = split_pairs(pairs, seed=seed, validation=validation, test=test)
    return {"n_raw": len(raw), "dropped": dict(dropped), "n_pairs": len(pairs),
            "splits": {s: dict(Counter(p.source for p in v)) | {"total": len(v)} for s, v in splits.items()}}


def data_files(root: Path | None = None) -> dict[str, Path]:
    """{label: path} of every pair file (hashed into the run manifest)."""
    root = Path(root) if root is not None else DATA_ROOT / DATA_DIR
    return {f"{DATA_DIR}/{p.relative_to(root)}": p for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".txt", ".jsonl")}


def data_files_sha256(root: Path | None = None) -> dict[str, str]:
    return {k: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for k, p in data_files(root).items()}


def sample_pairs(pairs: list[RewritePair], limit: int | None, *, seed: int) -> list[RewritePair]:
    """A seeded sample balanced across sources (round-robin), in the original order; None keeps all."""
    from ...benchmarks.base import stratified_sample

    if limit is None:
        return list(pairs)
    picked = stratified_sample([{"i": i, "source": p.source} for i, p in enumerate(pairs)], limit, seed=seed,
                               strata=("source",))
    return [pairs[d["i"]] for d in picked]
