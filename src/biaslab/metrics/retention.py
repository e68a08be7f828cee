"""Retention metrics: held-out perplexity and factual-knowledge accuracy, pure functions of per-item records.

Records carry ``part`` = "wikitext" (fields ``nll`` = −Σ log p over the window's scored tokens, ``n_tokens``,
``n_words``) or "knowledge" (field ``correct``). Each metric ignores records of the other part, so both can be
computed on the mixed record list (and on bootstrap resamples of windows / facts).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..stats import safe_div


def _part(records: Sequence[dict], part: str) -> list[dict]:
    return [r for r in records if r.get("part") == part]


def perplexity(records: Sequence[dict]) -> float:
    """Token-level perplexity exp(Σ nll / Σ n_tokens) over the wikitext windows (NaN without any)."""
    w = _part(records, "wikitext")
    tokens = sum(r["n_tokens"] for r in w)
    return math.exp(sum(r["nll"] for r in w) / tokens) if tokens else math.nan


def word_perplexity(records: Sequence[dict]) -> float:
    """Word-level perplexity exp(Σ nll / Σ n_words): comparable across tokenizers."""
    w = _part(records, "wikitext")
    words = sum(r["n_words"] for r in w)
    return math.exp(sum(r["nll"] for r in w) / words) if words else math.nan


def knowledge_accuracy(records: Sequence[dict]) -> float:
    """Fraction (0-1) of facts whose attribute is the model's greedy continuation."""
    k = _part(records, "knowledge")
    return safe_div(sum(bool(r["correct"]) for r in k), len(k))
