"""Benchmark base class, named protocols, metric definitions and seeded stratified sampling.

A Benchmark loads items from the vendored data, scores them under a named, versioned protocol through the
LanguageModel primitives only (it never imports a backend), and declares its metrics as pure functions of
the per-item records.
"""
from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BiaslabError, UnknownNameError


@dataclass(frozen=True)
class Protocol:
    name: str         # short name used on the command line, e.g. "letter"
    id: str           # versioned id recorded with every number, e.g. "bbq.letter.v2"
    description: str


@dataclass(frozen=True)
class MetricDef:
    name: str
    fn: Callable[[Sequence[dict]], float]
    description: str
    scale: str = "fraction 0-1"   # or "0-100"
    ideal: float | None = None
    headline: bool = True
    # "percentile" bootstrap interval, or "none" for statistics a bootstrap cannot bracket honestly: a maximum
    # over groups is biased upward under resampling (noisier group means give larger maxima), so its percentile
    # interval can lie entirely above the estimate (seen on BOLD: 0.313 with "CI" [0.326, 0.618]).
    ci_method: str = "percentile"

    def __post_init__(self):
        if self.ci_method not in ("percentile", "none"):
            raise ValueError(f"metric {self.name}: ci_method must be 'percentile' or 'none', got {self.ci_method!r}")


class Benchmark:
    """Subclasses set the class attributes and implement load_items / score / metric_defs."""

    name: str = ""
    description: str = ""
    protocols: tuple[Protocol, ...] = ()
    default_protocol: str = ""
    group_field: str = "group"            # records' field used for the per-group breakdown
    strata: tuple[str, ...] = ("group",)  # item fields used to stratify --limit samples
    data_files: tuple[str, ...] = ()      # paths under biaslab/data, hashed into the manifest
    options: dict = {}                    # option name -> default, settable from the CLI/API
    chunk_size: int = 64                  # items scored between two resume checkpoints
    coverage: str = ""                    # what of the published benchmark is here (shown by `biaslab benchmarks`)

    def __init__(self, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise UnknownNameError(f"{self.name} option", sorted(unknown)[0], self.options)
        self.opts = {**self.options, **options}

    # ---- protocols
    def protocol(self, name: str | None = None) -> Protocol:
        name = name or self.default_protocol
        for p in self.protocols:
            if name in (p.name, p.id):
                return p
        raise UnknownNameError(f"{self.name} protocol", name, [p.name for p in self.protocols])

    # ---- to implement
    def load_items(self) -> list[dict]:
        """All items; each has a unique, stable ``id`` and the fields named in ``strata``."""
        raise NotImplementedError

    def score(self, lm, items: list[dict], *, protocol: Protocol) -> list[dict]:
        """Per-item records (each with ``id`` and ``group_field``); several per item are allowed."""
        raise NotImplementedError

    def metric_defs(self, protocol: Protocol) -> list[MetricDef]:
        raise NotImplementedError

    def extra_results(self, records: list[dict], protocol: Protocol) -> dict:
        """Anything beyond metrics worth keeping in results.json (e.g. tie counts)."""
        return {}

    # ---- shared
    def sample(self, items: list[dict], limit: int | None, seed: int) -> list[dict]:
        return stratified_sample(items, limit, seed=seed, strata=self.strata)


def stratified_sample(items: list[dict], limit: int | None, *, seed: int, strata: Sequence[str]) -> list[dict]:
    """Deterministic sample of ``limit`` items balanced across strata (round-robin over strata, seeded shuffle
    inside each); returned in the original item order. ``limit=None`` keeps everything."""
    if limit is None:
        return list(items)
    if limit <= 0:
        raise BiaslabError(f"--limit must be a positive number of items, got {limit}")
    if limit >= len(items):
        return list(items)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        buckets[tuple(str(it.get(s)) for s in strata)].append(i)
    rng = random.Random(seed)
    keys = sorted(buckets)
    for k in keys:
        rng.shuffle(buckets[k])
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for k in keys:
            if depth < len(buckets[k]) and len(chosen) < limit:
                chosen.append(buckets[k][depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def prediction_tie_share(records: Sequence[dict]) -> float | None:
    """Share of scored records whose two best options have equal log-probabilities (to the records' 6 decimals):
    the prediction then falls to the first of them, a position bias of the number format (bf16 logits tied 16 %
    of BBQ letter items before the LM head was formed in float32; experiments/score/bf16_ties.md). None where no
    record carries option log-probabilities (the generate protocol)."""
    scored = [r["logprobs"] for r in records if len(r.get("logprobs") or ()) >= 2]
    if not scored:
        return None
    return sum(map(tied_at_top, scored)) / len(scored)


def tied_at_top(logprobs: Sequence[float]) -> bool:
    """Whether the two best options have equal scores."""
    best, second = heapq.nlargest(2, logprobs)
    return best == second
