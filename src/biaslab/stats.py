"""Statistics: bootstrap 95 % intervals over items (fixed seed) and a paired bootstrap for before/after deltas.

Resampling is over *items* (clusters): when an item has several records (e.g. BBQ under 10 instructions),
all of its records travel together, so the interval reflects item sampling, not instruction repetition.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Metric = Callable[[Sequence[dict]], float]
DEFAULT_BOOT = 1000
DEFAULT_SEED = 0


def safe_div(a: float, b: float) -> float:
    """a / b, NaN when b == 0 (a metric undefined on an empty subset, reported as null)."""
    return a / b if b else float("nan")


def instruction_mean(fn: Metric) -> Metric:
    """Lift a metric to 'mean over instructions' (records with an ``instruction`` index; the paper's mean over
    the M instructions). Records of a pooled control carry ``control_member`` (one patch of several, e.g. a
    random-pruning seed): the mean then runs over (member, instruction) cells. A cell whose value is undefined
    (NaN) is left out."""
    def lifted(records):
        by: dict = {}
        for r in records:
            by.setdefault((r.get("control_member", 0), r.get("instruction", 0)), []).append(r)
        vals = [v for v in (_safe(fn, rs) for rs in by.values()) if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan
    return lifted


def _clusters(records: Sequence[dict], key: str) -> tuple[list, dict]:
    ids, groups = [], {}
    for r in records:
        k = r.get(key, id(r))
        if k not in groups:
            groups[k] = []
            ids.append(k)
        groups[k].append(r)
    return ids, groups


def _safe(metric: Metric, recs: Sequence[dict]) -> float:
    try:
        v = metric(recs)
    except ZeroDivisionError:
        return math.nan
    return math.nan if v is None else float(v)


def _ci(samples: np.ndarray, level: float) -> list[float] | None:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_ci(records: Sequence[dict], metric: Metric, *, n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED,
                 level: float = 0.95, cluster_key: str = "id") -> dict:
    """``{"value": metric(records), "ci95": [lo, hi]}`` by percentile bootstrap over clusters of records."""
    value = _safe(metric, records)
    ids, groups = _clusters(records, cluster_key)
    if not ids or n_boot <= 0:
        return {"value": value, "ci95": None}
    rng = np.random.default_rng(seed)
    samples = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        samples[b] = _safe(metric, [r for j in pick for r in groups[ids[j]]])
    return {"value": value, "ci95": _ci(samples, level)}


def paired_bootstrap(before: Sequence[dict], after: Sequence[dict], metric: Metric, *, n_boot: int = DEFAULT_BOOT,
                     seed: int = DEFAULT_SEED, level: float = 0.95, cluster_key: str = "id") -> dict:
    """Delta ``metric(after) − metric(before)`` with a paired bootstrap: the same resampled items on both sides.

    Returns before, after, delta, delta_ci95 and p (two-sided share of resamples on the other side of 0)."""
    b_ids, b_groups = _clusters(before, cluster_key)
    _, a_groups = _clusters(after, cluster_key)
    common = [k for k in b_ids if k in a_groups]
    vb, va = _safe(metric, [r for k in common for r in b_groups[k]]), _safe(metric, [r for k in common for r in a_groups[k]])
    out = {"before": vb, "after": va, "delta": va - vb, "delta_ci95": None, "p": None, "n_items": len(common)}
    if not common or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(common), len(common))
        keys = [common[j] for j in pick]
        deltas[b] = _safe(metric, [r for k in keys for r in a_groups[k]]) - _safe(metric, [r for k in keys for r in b_groups[k]])
    out["delta_ci95"] = _ci(deltas, level)
    d = deltas[~np.isnan(deltas)]
    if d.size:
        out["p"] = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return out


def unpaired_bootstrap(a: Sequence[dict], b: Sequence[dict], metric: Metric, *, n_boot: int = DEFAULT_BOOT,
                       seed: int = DEFAULT_SEED, level: float = 0.95, cluster_key: str = "id") -> dict:
    """Difference ``metric(b) − metric(a)`` of two independent samples (other items): each side resampled on its
    own. Returns a, b, delta, delta_ci95."""
    a_ids, a_groups = _clusters(a, cluster_key)
    b_ids, b_groups = _clusters(b, cluster_key)
    va, vb = _safe(metric, a), _safe(metric, b)
    out = {"before": va, "after": vb, "delta": vb - va, "delta_ci95": None}
    if not a_ids or not b_ids or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for k in range(n_boot):
        pa = rng.integers(0, len(a_ids), len(a_ids))
        pb = rng.integers(0, len(b_ids), len(b_ids))
        deltas[k] = (_safe(metric, [r for j in pb for r in b_groups[b_ids[j]]])
                     - _safe(metric, [r for j in pa for r in a_groups[a_ids[j]]]))
    out["delta_ci95"] = _ci(deltas, level)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value), ignoring NaN."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def normal_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """mean ± z·sd/√n over runs (docs/methods/softprompt.md): returns (mean, lo, hi)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan
    half = z * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half
