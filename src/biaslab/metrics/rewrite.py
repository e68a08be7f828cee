"""Metrics for debiasing rewriters (SR_LLM, docs/methods/srllm.md): pure functions of per-item records.

A record is a dict with ``id``, ``biased`` (the input), ``reference`` (the gold neutral rewrite), ``rewrite``
(the system's output) and, for content preservation, ``cosine`` (see :class:`biaslab.methods.srllm.embedding.SentenceEmbedder`).

- ``chrf``: corpus chrF (sacrebleu defaults: character 6-grams, β = 2, case-sensitive), 0–100.
- ``bleu``: corpus BLEU (sacrebleu defaults: 13a tokenisation, case-sensitive), 0–100.
- ``exact_match``: share of rewrites equal to the reference after :func:`tokens` normalisation, 0–1.
- ``removal_rate``: of the words the reference removed (word tokens of the input that are not in the
  reference), the share absent from the rewrite; pooled over all items (micro average), 0–1. Items whose
  reference removes no word do not count. A rewrite that deletes everything scores 1: read it together with
  content preservation and chrF.
- ``content_preservation``: mean cosine similarity between sentence embeddings of input and rewrite, −1..1.
- ``copy_rate``: share of rewrites identical to the input after :func:`tokens` normalisation, 0–1.

Normalisation for exact match, copy and removal: lower-case, split into word and punctuation tokens, so
"kgb's" and "kgb ' s" (WNC's tokenisation) compare equal.
"""
from __future__ import annotations

import re
from collections.abc import Sequence


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def words(text: str) -> set[str]:
    """Lower-cased word tokens (no punctuation) as a set."""
    return set(re.findall(r"\w+", text.lower()))


def chrf(records: Sequence[dict]) -> float:
    from sacrebleu.metrics import CHRF

    if not records:
        return float("nan")
    return float(CHRF().corpus_score([r["rewrite"] for r in records], [[r["reference"] for r in records]]).score)


def bleu(records: Sequence[dict]) -> float:
    from sacrebleu.metrics import BLEU

    if not records:
        return float("nan")
    return float(BLEU().corpus_score([r["rewrite"] for r in records], [[r["reference"] for r in records]]).score)


def exact_match(records: Sequence[dict]) -> float:
    if not records:
        return float("nan")
    return sum(tokens(r["rewrite"]) == tokens(r["reference"]) for r in records) / len(records)


def copy_rate(records: Sequence[dict]) -> float:
    if not records:
        return float("nan")
    return sum(tokens(r["rewrite"]) == tokens(r["biased"]) for r in records) / len(records)


def removed_words(biased: str, reference: str) -> set[str]:
    """Words of the biased input that the reference rewrite removed."""
    return words(biased) - words(reference)


def removal_counts(record: dict) -> tuple[int, int]:
    """(removed words absent from the rewrite, removed words) for one record."""
    target = removed_words(record["biased"], record["reference"])
    return len(target - words(record["rewrite"])), len(target)


def removal_rate(records: Sequence[dict]) -> float:
    hit = total = 0
    for r in records:
        h, t = removal_counts(r)
        hit, total = hit + h, total + t
    return hit / total if total else float("nan")


def content_preservation(records: Sequence[dict]) -> float:
    vals = [r["cosine"] for r in records if r.get("cosine") is not None]
    return sum(vals) / len(vals) if vals else float("nan")


# name -> (function, scale, higher is better, description)
REWRITE_METRICS = {
    "chrf": (chrf, "0-100", True, "corpus chrF of rewrite vs reference (sacrebleu defaults)"),
    "bleu": (bleu, "0-100", True, "corpus BLEU of rewrite vs reference (sacrebleu defaults)"),
    "exact_match": (exact_match, "fraction 0-1", True, "rewrite equals the reference (normalised tokens)"),
    "removal_rate": (removal_rate, "fraction 0-1", True,
                     "share of the words the reference removed that are absent from the rewrite (micro average)"),
    "content_preservation": (content_preservation, "cosine -1..1", True,
                             "mean cosine of all-MiniLM-L6-v2 embeddings of input and rewrite"),
    "copy_rate": (copy_rate, "fraction 0-1", None, "rewrite identical to the input (normalised tokens)"),
}
