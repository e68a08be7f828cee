"""CRISPR's data splits and neuron selection: the seeded dev/test split, stratified samples, top-n and random
(control) units, and the golden-section search for n with its dev objectives (docs/methods/crispr.md)."""
from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ... import attribution as attr
from ...errors import BiaslabError, UnknownNameError
from ...tasks import LETTERS, MCItem
from .config import GOLDEN_RATIO, SEARCH_OBJECTIVES, CrisprConfig

def check_task_items(items: Sequence[MCItem], name: str = "task", instructions: int | None = None) -> None:
    """Refuse a task CRISPR cannot fit: no items, too few / too many options, or fewer instructions than
    ``instructions`` (a task file's header may give fewer than the ten generic ones)."""
    from ...tasks import task_instruction_count

    if not items:
        raise BiaslabError(f"{name} has no items")
    if instructions is not None and instructions > (avail := task_instruction_count(items)):
        raise BiaslabError(f"--instructions {instructions} asks for more instructions than task {name} has "
                           f"({avail}); use --instructions 1-{avail}")
    for it in items:
        if len(it.options) < 2:  # MCItem already refuses this; kept for duck-typed items
            raise BiaslabError(f"{name} item {it.id}: CRISPR needs at least 2 options (a wrong one to attribute)")
        if len(it.options) > len(LETTERS):
            raise BiaslabError(f"{name} item {it.id}: at most {len(LETTERS)} options are supported, got {len(it.options)}")


def split_dev_test(items: Sequence[MCItem], *, dev_fraction: float = 0.1, seed: int = 0) -> tuple[list[MCItem], list[MCItem]]:
    """Seeded split: ``ceil(dev_fraction·N)`` dev items, the rest test (both in the original order)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_dev = max(1, math.ceil(dev_fraction * len(items)))
    if n_dev >= len(items):
        raise BiaslabError(f"a task of {len(items)} items is too small for a dev/test split")
    dev = set(idx[:n_dev])
    return [it for i, it in enumerate(items) if i in dev], [it for i, it in enumerate(items) if i not in dev]


def strata_key(it: MCItem) -> tuple:
    m = it.meta
    return (m.get("category", ""), m.get("context_condition", ""), m.get("question_polarity", ""), it.gold if not m.get("category") else "")


def sample_items(items: Sequence[MCItem], n: int | None, seed: int) -> list[MCItem]:
    """Deterministic stratified sample (round-robin over strata: label for SST-2; category × context condition
    × polarity for BBQ), returned in the original order. ``None`` or n ≥ len keeps all."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise BiaslabError(f"sample size must be positive, got {n}")
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        buckets[strata_key(it)].append(i)
    rng = random.Random(seed)
    keys = sorted(buckets)
    for k in keys:
        rng.shuffle(buckets[k])
    chosen, depth = [], 0
    while len(chosen) < n:
        for k in keys:
            if depth < len(buckets[k]) and len(chosen) < n:
                chosen.append(buckets[k][depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def ids_hash(items: Sequence[MCItem]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest()[:16]


def top_units(scores: dict[str, torch.Tensor], n: int) -> dict[str, list[int]]:
    """The top-n neurons over all sites, as {site: sorted unit indices}."""
    out: dict[str, list[int]] = defaultdict(list)
    for name, unit, _ in attr.rank_neurons(scores, n):
        out[name].append(unit)
    return {k: sorted(v) for k, v in out.items()}


def random_units(site_sizes: dict[str, int], counts: dict[str, int], seed: int,
                 exclude: dict[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The random control: for each site, as many uniformly random units as ``counts`` names there (site-matched),
    never one of ``exclude`` (CRISPR's own units: a control that drew them would be CRISPR, which happened once
    with a 1-neuron patch, p = 1/1536). The first ``k`` non-excluded units of a seeded permutation, so a draw that
    hits no excluded unit is the same as without ``exclude``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(counts):
        k = counts[name]
        if k:
            skip = set((exclude or {}).get(name, ()))
            if site_sizes[name] - len(skip) < k:
                raise BiaslabError(f"site {name}: cannot draw {k} control units outside the {len(skip)} excluded "
                                   f"of its {site_sizes[name]}")
            perm = [u for u in torch.randperm(site_sizes[name], generator=g).tolist() if u not in skip]
            out[name] = sorted(perm[:k])
    return out


def golden_section_search(f: Callable[[int], float], lo: int = 0, hi: int = 500, tol: int = 4) -> tuple[int, dict[int, float]]:
    """Maximise an integer function by golden-section search (released CRISPR code): shrink [lo, hi] until its
    width ≤ tol, then try every remaining n. Every value is computed once (cached). Returns (best n, {n: f(n)});
    ties go to the smaller n."""
    if tol < 1:
        raise BiaslabError(f"search tolerance must be ≥ 1 (else the search cannot terminate), got {tol}")
    if hi < lo:
        raise BiaslabError(f"empty search interval [{lo}, {hi}]")
    cache: dict[int, float] = {}

    def F(n: int) -> float:
        if n not in cache:
            cache[n] = float(f(n))
        return cache[n]

    while hi - lo > tol:
        c = hi - round((hi - lo) * GOLDEN_RATIO)
        d = lo + round((hi - lo) * GOLDEN_RATIO)
        if F(c) < F(d):
            lo = c
        else:
            hi = d
    for n in range(lo, hi + 1):
        F(n)
    best = max(cache, key=lambda n: (cache[n] if not math.isnan(cache[n]) else -math.inf, -n))
    return best, cache


def choose_n(f: Callable[[int], float], cfg: CrisprConfig) -> tuple[int, dict[int, float]]:
    """The n search of ``cfg``: golden-section search of ``f`` (the dev objective) over [0, search_max], then the
    unpruned model (n = 0, always: prune only if it helps on dev) and, with ``search_small = K``, every n in 1..K
    (a deviation: golden-section search assumes a unimodal objective, and on a plateau — every large n giving the
    same constant answer — a one-record difference can steer it away from a peak at small n, as happened on SST-2
    with 10 instructions). Best value wins; ties go to the smaller n. Returns (n, {n: f(n)})."""
    n, search = golden_section_search(f, 0, cfg.search_max, cfg.search_tol)
    extra = [k for k in [0, *range(1, min(cfg.search_small, cfg.search_max) + 1)] if k not in search]
    for k in extra:
        search[k] = float(f(k))
    if extra:
        n = max(search, key=lambda k: (search[k] if not math.isnan(search[k]) else -math.inf, -k))
    return n, search


def accuracy_mean(records: Sequence[dict]) -> float:
    """Accuracy averaged over instructions (the paper's mean accuracy)."""
    by: dict = defaultdict(list)
    for r in records:
        by[r.get("instruction", 0)].append(r["correct"])
    vals = [sum(v) / len(v) for v in by.values() if v]
    return sum(vals) / len(vals) if vals else math.nan


def gold_prob_mean(records: Sequence[dict]) -> float:
    """Mean over instructions of the mean option-normalised probability of the gold option (the expected accuracy
    of answering by sampling from the option distribution)."""
    by: dict = defaultdict(list)
    for r in records:
        lp = r["logprobs"]
        m = max(lp)
        z = sum(math.exp(x - m) for x in lp)
        by[r.get("instruction", 0)].append(math.exp(lp[r["gold"]] - m) / z)
    vals = [sum(v) / len(v) for v in by.values() if v]
    return sum(vals) / len(vals) if vals else math.nan


def condition_hmean(records: Sequence[dict]) -> float:
    """Mean over instructions of the harmonic mean of the accuracies on BBQ's ambiguous and disambiguated items
    (a named deviation from the released code's dev accuracy, for the ``condition-hmean`` search objective).

    On BBQ the gold answer of every ambiguous item is "unknown" and of no disambiguated item, so answering
    "unknown" to everything scores accuracy ≈ 0.5 — the collapse that pruning hundreds of neurons produces
    (experiments/crispr/results.md, BBQ-Age option-loglik). The harmonic mean of the two conditions' accuracies
    is 0 for that collapse and rewards fixing ambiguous answers only while disambiguated answers stay right."""
    by: dict = defaultdict(lambda: {"ambig": [], "disambig": []})
    for r in records:
        cond = r.get("context_condition")
        if cond in ("ambig", "disambig"):
            by[r.get("instruction", 0)][cond].append(r["correct"])
    vals = []
    for k, d in sorted(by.items()):
        if not d["ambig"] or not d["disambig"]:
            continue
        a, b = sum(d["ambig"]) / len(d["ambig"]), sum(d["disambig"]) / len(d["disambig"])
        vals.append(0.0 if a + b == 0 else 2 * a * b / (a + b))
    if not vals:
        raise BiaslabError("search objective condition-hmean needs BBQ items with both ambiguous and disambiguated "
                           "contexts (records with context_condition 'ambig' and 'disambig'); these records have "
                           f"{sorted({str(r.get('context_condition')) for r in records})}")
    return sum(vals) / len(vals)


def search_objective_value(records: Sequence[dict], objective: str = "accuracy") -> float:
    """The dev objective the n search maximises.

    ``accuracy``: mean accuracy over instructions (the released code). ``accuracy+goldprob`` (a named deviation):
    the same accuracy with ties broken by :func:`gold_prob_mean` — ``acc + goldprob / (K + 1)`` with K the number
    of (item, instruction) records. When every instruction has the same items, accuracy is a multiple of 1/K and
    goldprob ∈ [0, 1], so the order is lexicographic: a higher dev accuracy always wins, and the gold probability
    only decides between equal accuracies (e.g. a model that answers one label for every item, where dev accuracy
    is flat in n)."""
    if objective not in SEARCH_OBJECTIVES:
        raise UnknownNameError("search objective", objective, SEARCH_OBJECTIVES)
    if objective == "condition-hmean":
        return condition_hmean(records)
    acc = accuracy_mean(records)
    if objective == "accuracy":
        return acc
    return acc + gold_prob_mean(records) / (len(records) + 1)

