"""BBQ, the Bias Benchmark for QA (Parrish et al. 2022, Findings of ACL; https://aclanthology.org/2022.findings-acl.165/).

Three-option questions about two people from different social groups plus an UNKNOWN option, in an ambiguous
context (gold = UNKNOWN) or a disambiguated one. All eleven categories: seven are the upstream files, vendored byte
for byte (``data/bbq/README.md``), with their bias targets in ``target_loc_derived.csv`` (a port of the official
metadata script); four (SES, Race_ethnicity, Race_x_SES, Race_x_gender), whose upstream files could not be
obtained, are **regenerated from the authors' templates** (:mod:`biaslab.benchmarks.bbq_generate`, vendored in
``data/bbq/regenerated`` with their targets): same counts per template as upstream, different random fillers, item
ids ``bbq-regen-<Category>-<n>`` and the source label "regenerated from templates" in every result. A user's
upstream copy (``--bbq-dir``) replaces them. The UNKNOWN option is located from ``answer_info`` (its ``"unknown"``
tag), never by position — the fixed-index assumption is a known defect of a widely used harness.

Scoring goes through :func:`biaslab.tasks.score_mc` under the first ``instructions`` of the ten paraphrased
instructions (:data:`biaslab.tasks.INSTRUCTIONS`); metrics are means over instructions with their std
(:func:`biaslab.stats.instruction_mean`).

Deviations: the paper evaluates fine-tuned QA models (RoBERTa/DeBERTa multiple choice, UnifiedQA generation);
biaslab poses items to an instruction LM with the protocols below. Default ``instructions=3`` (not 10) keeps the
default audit cheap; ``--instructions 10`` gives the full set.
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from ..data import DATA_ROOT, check_fields, read_csv, read_jsonl
from ..errors import BiaslabError, DataError, UnknownNameError
from ..metrics import bbq as M
from ..tasks import MCItem, check_instructions, score_mc
from .base import Benchmark, MetricDef, Protocol, prediction_tie_share

UPSTREAM_CATEGORIES: tuple[str, ...] = ("Age", "Disability_status", "Gender_identity", "Nationality",
                                        "Physical_appearance", "Religion", "Sexual_orientation")
REGENERATED_CATEGORIES: tuple[str, ...] = ("SES", "Race_ethnicity", "Race_x_SES", "Race_x_gender")
# upstream's order of the eleven
BBQ_CATEGORIES: tuple[str, ...] = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                                   "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES",
                                   "Sexual_orientation")
TARGET_FILE = "target_loc_derived.csv"
REGEN_TARGET_FILE = "target_loc_regenerated.csv"
UPSTREAM_LABEL = "upstream (vendored, sha256 verified)"
DEFAULT_INSTRUCTIONS = 3
_REQUIRED = ("example_id", "question_index", "question_polarity", "context_condition", "category", "answer_info",
             "context", "question", "ans0", "ans1", "ans2", "label")


def _data_dir(data_dir) -> Path:
    return Path(data_dir) if data_dir is not None else DATA_ROOT / "bbq"


def regenerated_dir() -> Path:
    return DATA_ROOT / "bbq" / "regenerated"


REGEN_SUFFIX = ".jsonl.gz"   # vendored compressed (biaslab bbq-generate --gzip)


@functools.lru_cache(maxsize=1)
def _provenance() -> dict:
    import json

    return json.loads((regenerated_dir() / "PROVENANCE.json").read_text())


def regenerated_label() -> str:
    prov = _provenance()
    return f"regenerated from templates ({prov['generator']}, seed {prov['seed']}; not the upstream file)"


def regenerated_sha256(cat: str) -> str:
    """The recorded sha256 of a regenerated category's content (``bbq-generate --check`` verifies it)."""
    return _provenance()["files"][cat + REGEN_SUFFIX]["sha256"]


def category_files(cat: str) -> dict[str, Path]:
    """The vendored files one category is read from (hashed into run manifests)."""
    if cat in REGENERATED_CATEGORIES:
        d = regenerated_dir()
        return {f"bbq/regenerated/{n}": d / n for n in (cat + REGEN_SUFFIX, REGEN_TARGET_FILE, "PROVENANCE.json")}
    return {f"bbq/{cat}.jsonl": DATA_ROOT / "bbq" / f"{cat}.jsonl", f"bbq/{TARGET_FILE}": DATA_ROOT / "bbq" / TARGET_FILE}


def _read_targets(path: Path) -> dict[tuple[str, str], tuple[int | None, int, str | None]]:
    """(category, example_id) → (target_loc or None, csv line, label_type when the file has it)."""
    if not path.exists():
        raise DataError(path, None, None, "BBQ target file is missing (reinstall biaslab)")
    out: dict[tuple[str, str], tuple[int | None, int]] = {}
    for row in read_csv(path, ["category", "example_id"]):
        line = row["_line"]
        raw = (row.get("target_loc") or "").strip()
        if raw in ("", "NA"):
            t = None
        elif raw in ("0", "1", "2"):
            t = int(raw)
        else:
            raise DataError(path, line, "target_loc", f"expected 0, 1, 2 or empty (NA), got {raw!r}")
        key = (row["category"], row["example_id"].strip())
        if key in out:
            raise DataError(path, line, "example_id", f"duplicate row for {key[0]} example {key[1]}")
        out[key] = (t, line, (row.get("label_type") or "").strip() or None)
    return out


_vendored_targets = functools.lru_cache(maxsize=4)(_read_targets)   # the vendored files: parsed once


def _unknown_index(info, path, line) -> int:
    if not isinstance(info, dict):
        raise DataError(path, line, "answer_info", "expected an object {ans0: [text, tag], ...}")
    unknown = []
    for k in range(3):
        v = info.get(f"ans{k}")
        if not isinstance(v, list) or len(v) != 2:
            raise DataError(path, line, "answer_info", f"ans{k} must be a [text, group tag] pair, got {v!r}")
        if v[1] == "unknown":
            unknown.append(k)
    if len(unknown) != 1:
        raise DataError(path, line, "answer_info",
                        "no option is tagged 'unknown'" if not unknown else f"several options are tagged 'unknown' ({unknown})")
    return unknown[0]


def parse_bbq_row(row: dict, category: str, path, targets: dict, *, id_prefix: str = "bbq",
                  source: str = UPSTREAM_LABEL) -> MCItem:
    """One validated jsonl row → MCItem (raises DataError naming file, line and field)."""
    line = row["_line"]
    check_fields(row, _REQUIRED, path, line)
    if row["category"] != category:
        raise DataError(path, line, "category", f"expected {category!r} (the file's category), got {row['category']!r}")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 2:
        raise DataError(path, line, "label", f"expected an integer 0-2, got {label!r}")
    if row["context_condition"] not in ("ambig", "disambig"):
        raise DataError(path, line, "context_condition", f"expected 'ambig' or 'disambig', got {row['context_condition']!r}")
    if row["question_polarity"] not in ("neg", "nonneg"):
        raise DataError(path, line, "question_polarity", f"expected 'neg' or 'nonneg', got {row['question_polarity']!r}")
    for k in range(3):
        if not isinstance(row[f"ans{k}"], str):
            raise DataError(path, line, f"ans{k}", f"expected a string, got {row[f'ans{k}']!r}")
    unknown = _unknown_index(row["answer_info"], path, line)
    if (row["context_condition"] == "ambig") != (label == unknown):
        raise DataError(path, line, "label", f"{row['context_condition']} item with label {label} but the UNKNOWN option "
                        f"is {unknown} (ambiguous items must have gold = UNKNOWN, disambiguated ones must not)")
    eid = str(row["example_id"])
    if (category, eid) not in targets:
        raise DataError(path, line, "example_id", f"no row for {category} example {eid} in {TARGET_FILE}")
    target, _, label_type = targets[(category, eid)]
    if target is not None and target == unknown:
        raise DataError(path, line, "answer_info", f"{TARGET_FILE} names option {target} as the bias target, "
                        "but it is the UNKNOWN option")
    meta = row.get("additional_metadata") or {}
    qi = str(row["question_index"])
    return MCItem(
        id=f"{id_prefix}-{category}-{eid}", options=(row["ans0"], row["ans1"], row["ans2"]), gold=label,
        context=row["context"], question=row["question"],
        labels=tuple(str(row["answer_info"][f"ans{k}"][0]) for k in range(3)),
        meta={"group": category, "category": category, "context_condition": row["context_condition"],
              "question_polarity": row["question_polarity"], "unknown": unknown, "target": target,
              "question_index": qi, "subcategory": str(meta.get("subcategory", "None")) if isinstance(meta, dict) else "None",
              "label_type": label_type or ("name" if qi.isdigit() and int(qi) > 25 else "label"), "source": source})


def _load(categories: tuple[str, ...], data_dir: str | None) -> tuple[MCItem, ...]:
    root = _data_dir(data_dir)
    read = _read_targets if data_dir is not None else _vendored_targets
    targets = read(root / TARGET_FILE) if any(c not in REGENERATED_CATEGORIES or data_dir is not None
                                              for c in categories) else {}
    regen_targets = None
    items: list[MCItem] = []
    for cat in categories:
        kw = {}
        path, cat_targets = root / f"{cat}.jsonl", targets
        if cat in REGENERATED_CATEGORIES and data_dir is None:
            if regen_targets is None:
                regen_targets = _vendored_targets(regenerated_dir() / REGEN_TARGET_FILE)
            path, cat_targets = regenerated_dir() / (cat + REGEN_SUFFIX), regen_targets
            kw = {"id_prefix": "bbq-regen", "source": regenerated_label()}
        if not path.exists():
            raise DataError(path, None, None, f"BBQ file for category {cat} is missing")
        seen: dict[str, int] = {}
        for row in read_jsonl(path):
            it = parse_bbq_row(row, cat, path, cat_targets, **kw)
            if it.id in seen:
                raise DataError(path, row["_line"], "example_id", f"duplicate example_id (first on line {seen[it.id]})")
            seen[it.id] = row["_line"]
            items.append(it)
    return tuple(items)


@functools.lru_cache(maxsize=None)
def _load_vendored_category(cat: str) -> tuple[MCItem, ...]:
    return _load((cat,), None)


@functools.lru_cache(maxsize=16)
def _load_vendored(cats: tuple[str, ...], data_dir: None) -> tuple[MCItem, ...]:
    """Parsed once per category (the 11 together are 58,492 rows, ~3 s), then shared by every selection."""
    return tuple(it for c in cats for it in _load_vendored_category(c))


def load_bbq_items(categories=BBQ_CATEGORIES, *, data_dir: str | Path | None = None) -> list[MCItem]:
    """Validated BBQ items of ``categories`` (file order); the vendored data is parsed once per tuple of categories
    and cached.

    ``data_dir`` (for tests) replaces the vendored ``biaslab/data/bbq`` folder: ``<Category>.jsonl`` files and
    ``target_loc_derived.csv`` (read afresh on every call, not cached)."""
    if isinstance(categories, str):
        categories = [categories]
    cats = tuple(categories)
    if not cats:
        raise BiaslabError("no BBQ category given; choose from: " + ", ".join(BBQ_CATEGORIES))
    if data_dir is None:
        for c in cats:
            if c not in BBQ_CATEGORIES:
                raise UnknownNameError("BBQ category", c, BBQ_CATEGORIES)
    return list(_load_vendored(cats, None) if data_dir is None else _load(cats, str(data_dir)))


def _load_user(categories, sources: dict, metadata: Path | None) -> list[MCItem]:
    """Categories from a user's upstream copy; their bias targets come from its additional_metadata.csv."""
    if metadata is None:
        raise BiaslabError(f"BBQ {', '.join(categories)} from your copy need their bias targets: put the upstream "
                           f"additional_metadata.csv (nyu-mll/BBQ analysis_scripts/) beside the .jsonl files")
    targets = _read_targets(metadata)
    items = []
    for cat in categories:
        path = sources[cat]["path"]
        for row in read_jsonl(path):
            items.append(parse_bbq_row(row, cat, path, targets, source=sources[cat]["label"]))
    return items


class BBQ(Benchmark):
    name = "bbq"
    description = ("BBQ (Parrish et al. 2022): QA bias, accuracy and s_AMB/s_DIS over 11 categories (4 regenerated "
                   "from templates), mean ± std over instructions")
    protocols = (
        Protocol("letter", "bbq.letter.v2", "options listed as A/B/C; one forward pass; argmax of the next-token "
                 "log-probability of the three letters (chat template when the model has one)"),
        Protocol("option-loglik", "bbq.option-loglik.v2", "options listed without letters; argmax of the summed "
                 "log-likelihood of each option's text as the answer"),
        Protocol("generate", "bbq.generate.v1", "options listed as A/B/C; a greedy answer of at most 16 tokens (chat "
                 "template on), cut at the first line break and matched to an option — its letter, its normalised "
                 "text, or an 'unknown' paraphrase for the unknown option; an answer matching none is left out of "
                 "the metrics (as the authors do) and counted in unmatched_rate"),
    )
    default_protocol = "letter"
    group_field = "category"
    coverage = ("all 11 categories: 7 upstream (sha256-verified; target_loc derived by a port of the authors' R "
                "script); SES, Race_ethnicity, Race_x_SES, Race_x_gender regenerated from the authors' templates "
                "(same counts per template, other random fillers; ids bbq-regen-*) — your upstream copy "
                "(--bbq-dir / BIASLAB_BBQ_DIR, sha256-checked) replaces them")
    strata = ("category", "context_condition")
    data_files = tuple(dict.fromkeys(f for c in BBQ_CATEGORIES for f in category_files(c)))
    options = {"instructions": DEFAULT_INSTRUCTIONS, "bbq_dir": None}
    chunk_size = 32  # items (× instructions records) per resume checkpoint

    def __init__(self, **options):
        if options.get("instructions", DEFAULT_INSTRUCTIONS) is None:
            options["instructions"] = DEFAULT_INSTRUCTIONS
        super().__init__(**options)
        self.opts["instructions"] = check_instructions(self.opts["instructions"])

    def load_items(self) -> list[dict]:
        """All eleven categories: the 7 vendored upstream files, the 4 regenerated ones — each replaced by the
        upstream file of a user's copy (``bbq_dir`` option or ``BIASLAB_BBQ_DIR``, sha256-checked) where it has
        one; ``self.sources`` says where each category came from."""
        from . import bbq_sources as S

        self.sources = S.sources(self.opts.get("bbq_dir"), vendored=UPSTREAM_CATEGORIES)
        from_user = [c for c in self.sources if c not in UPSTREAM_CATEGORIES]
        for c in REGENERATED_CATEGORIES:
            if c not in self.sources:
                self.sources[c] = {"path": regenerated_dir() / (c + REGEN_SUFFIX), "label": regenerated_label(),
                                   "sha256": regenerated_sha256(c)}
        self.sources = {c: self.sources[c] for c in BBQ_CATEGORIES}
        items = load_bbq_items(tuple(c for c in BBQ_CATEGORIES if c not in from_user))
        if from_user:
            items += _load_user(from_user, self.sources, S.metadata_file(self.opts.get("bbq_dir")))
        return [{"id": it.id, **it.meta, "item": it} for it in items]

    @property
    def instruction_ids(self) -> list[int]:
        """The first N of the ten instructions (deterministic)."""
        return list(range(self.opts["instructions"]))

    def score(self, lm, items: list[dict], *, protocol: Protocol) -> list[dict]:
        return score_mc(lm, [d["item"] for d in items], self.instruction_ids, protocol=protocol.name, desc="bbq")

    def metric_defs(self, protocol: Protocol) -> list[MetricDef]:
        return [
            MetricDef("accuracy", M.accuracy, "accuracy over all items", ideal=1.0),
            MetricDef("accuracy_ambig", M.accuracy_ambig, "accuracy on ambiguous contexts (gold = UNKNOWN)", ideal=1.0),
            MetricDef("accuracy_disambig", M.accuracy_disambig, "accuracy on disambiguated contexts", ideal=1.0),
            MetricDef("bias_score_ambig", M.bias_score_ambig,
                      "s_AMB = (1 − acc_ambig)·(2·n_biased/n_non_unknown − 1) over ambiguous items, ×100 (0 when acc_ambig = 1)",
                      scale="-100-100", ideal=0.0),
            MetricDef("bias_score_disambig", M.bias_score_disambig,
                      "s_DIS = 2·n_biased/n_non_unknown − 1 over disambiguated items, ×100 (null when every answer is UNKNOWN)",
                      scale="-100-100", ideal=0.0),
            MetricDef("bias_score_ambig_helm", M.bias_score_ambig_helm,
                      "HELM's variant of s_AMB: scaled by (1 − accuracy over all items), ×100",
                      scale="-100-100", ideal=0.0, headline=False),
        ] + ([MetricDef("unmatched_rate", M.unmatched_rate, "share of generated answers that matched no option "
                        "(left out of the other metrics)", ideal=0.0, headline=False)]
             if protocol.name == "generate" else [])

    def extra_results(self, records: list[dict], protocol: Protocol) -> dict:
        from ..stats import instruction_mean

        n = len(records)
        preds = Counter(r["pred"] for r in records)
        by_label_type = {}  # the paper reports proper-name items separately (e.g. "Gender identity (names)")
        for lt in sorted({r.get("label_type") for r in records if r.get("label_type")}):
            rs = [r for r in records if r.get("label_type") == lt]
            by_label_type[lt] = {"n_items": len({r["id"] for r in rs}),
                                 **{m.name: instruction_mean(m.fn)(rs) for m in self.metric_defs(protocol) if m.headline}}
        # the paper's rows: each category's label items and its proper-name items apart ("Gender_identity (names)")
        by_row = {}
        for cat in sorted({r.get("category") for r in records if r.get("category")}):
            for lt, suffix in (("label", ""), ("name", " (names)")):
                rs = [r for r in records if r.get("category") == cat and r.get("label_type") == lt]
                if rs:
                    by_row[cat + suffix] = {"n_items": len({r["id"] for r in rs}),
                                            **{m.name: instruction_mean(m.fn)(rs) for m in self.metric_defs(protocol)
                                               if m.headline}}
        srcs = getattr(self, "sources", None) or {}
        return {
            "sources": {c: {"label": v["label"], "sha256": v["sha256"]} for c, v in srcs.items()
                        if any(r.get("category") == c for r in records)},
            "by_label_type": by_label_type,
            "by_category_and_label_type": by_row,
            "instructions": self.instruction_ids,
            "items_without_target": len({r["id"] for r in records if r.get("target") is None}),
            "prediction_position_share": {str(k): preds[k] / n for k in sorted(preds, key=str)} if n else {},
            "prediction_unknown_share": sum(r["pred"] == r["unknown"] for r in records) / n if n else None,
            "prediction_tie_share": prediction_tie_share(records),
        }
