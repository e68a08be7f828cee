"""Group fairness of a 3-class sentiment classifier on template sentences (docs/methods/softprompt.md; Tian et al. 2023,
arXiv 2306.04735, following Czarnowska et al. 2021).

Per run r, category c and group g:
- the 3×3 confusion matrix (rows gold, columns predicted; classes 0 negative, 1 neutral, 2 positive);
- accuracy; one-vs-rest per class ℓ: ``FPR_ℓ = FP/(FP+TN)``, ``TPR_ℓ = TP/(TP+FN)`` (NaN when undefined);
- **gap** ``m(g) − mean_{g' in c} m(g')``: the unweighted mean over the category's groups in the same run
  (groups where m is undefined are left out of the mean and get a NaN gap).
Across runs: mean gap ± 1.96·sd/√n (:func:`biaslab.stats.normal_interval`, sd with ddof=1); a group is
*flagged* when that 95 % interval excludes 0 (with a 1e-9 tolerance so that float noise on an exactly-zero gap
shared by every run is not a flag; one run gives no interval and no flag). Spread per category and metric:
max − min over groups of the mean gap (equal to max − min of the groups' mean metric).

Records are plain dicts with ``run``, ``category``, ``group``, ``label`` (gold) and ``pred``. Pure functions.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from ..stats import normal_interval

CLASSES = ("negative", "neutral", "positive")
METRICS = ("accuracy",) + tuple(f"fpr_{c}" for c in CLASSES) + tuple(f"tpr_{c}" for c in CLASSES)
HEADLINE = ("fpr_negative", "fpr_positive")
FLAG_TOL = 1e-9


def confusion_matrix(golds: Iterable[int], preds: Iterable[int], n_classes: int = 3) -> np.ndarray:
    """``cm[gold, pred]`` counts."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for g, p in zip(golds, preds):
        cm[int(g), int(p)] += 1
    return cm


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


def rates(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and one-vs-rest FPR/TPR per class from a confusion matrix ``cm[gold, pred]``."""
    total = cm.sum()
    out = {"accuracy": _ratio(np.trace(cm), total)}
    for k, name in enumerate(CLASSES[: cm.shape[0]]):
        tp = cm[k, k]
        fn = cm[k, :].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        out[f"fpr_{name}"] = _ratio(fp, fp + tn)
        out[f"tpr_{name}"] = _ratio(tp, tp + fn)
    return out


def group_rates(records: Sequence[dict], *, run_key: str = "run") -> dict:
    """``{run: {category: {group: {"n": n, "confusion": 3x3 list, metric: value}}}}``."""
    cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        cells[r.get(run_key, 0)][r["category"]][r["group"]].append((r["label"], r["pred"]))
    out: dict = {}
    for run, cats in cells.items():
        out[run] = {}
        for cat, groups in cats.items():
            out[run][cat] = {}
            for grp, pairs in groups.items():
                cm = confusion_matrix([g for g, _ in pairs], [p for _, p in pairs])
                out[run][cat][grp] = {"n": len(pairs), "confusion": cm.tolist(), **rates(cm)}
    return out


def group_gaps(rates_by_run: dict, metrics: Sequence[str] = METRICS) -> dict:
    """``{run: {category: {group: {metric: m(g) − unweighted mean over the category's groups}}}}``."""
    out: dict = {}
    for run, cats in rates_by_run.items():
        out[run] = {}
        for cat, groups in cats.items():
            out[run][cat] = {g: {} for g in groups}
            for m in metrics:
                vals = [groups[g][m] for g in groups if not math.isnan(groups[g][m])]
                mean = sum(vals) / len(vals) if vals else math.nan
                for g in groups:
                    out[run][cat][g][m] = groups[g][m] - mean
    return out


def interval_over_runs(values: Sequence[float], z: float = 1.96) -> dict:
    """Mean ± z·sd/√n over runs and the flag (interval excludes 0); NaN runs are dropped."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "flagged": False}
    mean, lo, hi = normal_interval(v, z=z)
    flagged = bool(not math.isnan(lo) and (lo > FLAG_TOL or hi < -FLAG_TOL))
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(v), "flagged": flagged}


def gap_table(records: Sequence[dict], *, run_key: str = "run", metrics: Sequence[str] = METRICS,
              z: float = 1.96) -> dict:
    """The docs/methods/softprompt.md table: ``{category: {"groups": {group: {"n": items per run, metric: {"mean", "lo", "hi",
    "n", "flagged", "gaps": per-run gaps, "value": mean metric over runs}}}, "spread": {metric: max − min}}}``.

    Runs are ordered by first appearance in ``records``."""
    rates_by_run = group_rates(records, run_key=run_key)
    gaps = group_gaps(rates_by_run, metrics)
    runs = list(rates_by_run)
    cats = sorted({c for r in runs for c in rates_by_run[r]})
    table: dict = {}
    for cat in cats:
        groups = sorted({g for r in runs for g in rates_by_run[r].get(cat, {})})
        gt: dict = {}
        for g in groups:
            present = [r for r in runs if g in rates_by_run[r].get(cat, {})]
            row: dict = {"n": rates_by_run[present[0]][cat][g]["n"]}
            for m in metrics:
                per_run = [gaps[r][cat][g][m] for r in present]
                vals = [rates_by_run[r][cat][g][m] for r in present]
                vals = [x for x in vals if not math.isnan(x)]
                row[m] = {**interval_over_runs(per_run, z), "gaps": per_run,
                          "value": sum(vals) / len(vals) if vals else math.nan}
            gt[g] = row
        spread = {}
        for m in metrics:
            means = [gt[g][m]["mean"] for g in groups if not math.isnan(gt[g][m]["mean"])]
            spread[m] = max(means) - min(means) if len(means) > 1 else math.nan
        table[cat] = {"groups": gt, "spread": spread}
    return table


def flags(table: dict, metrics: Sequence[str] = HEADLINE) -> set[tuple[str, str, str]]:
    """The flagged (category, group, metric) triples of a :func:`gap_table`."""
    return {(c, g, m) for c, ct in table.items() for g, row in ct["groups"].items() for m in metrics
            if row[m]["flagged"]}


def compare_flags(reference: set, other: set) -> dict:
    """How many flags change from ``reference`` to ``other``: kept, lost (only in reference), gained."""
    return {"kept": len(reference & other), "lost": len(reference - other), "gained": len(other - reference),
            "changed": len(reference ^ other)}


# ---- record -> float metrics (for the Benchmark interface; mean over runs)
def mean_metric(records: Sequence[dict], metric: str, *, run_key: str = "run") -> float:
    """``metric`` (e.g. accuracy, fpr_negative) of all records of each run, averaged over runs."""
    by: dict = defaultdict(list)
    for r in records:
        by[r.get(run_key, 0)].append(r)
    vals = [rates(confusion_matrix([r["label"] for r in rs], [r["pred"] for r in rs]))[metric] for rs in by.values()]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def max_abs_gap(records: Sequence[dict], metric: str, *, run_key: str = "run") -> float:
    """Largest |mean gap over runs| of ``metric`` across all groups of all categories (NaN if no category has
    two groups in ``records``)."""
    table = gap_table(records, run_key=run_key, metrics=(metric,))
    vals = [abs(row[metric]["mean"]) for ct in table.values() if len(ct["groups"]) > 1
            for row in ct["groups"].values() if not math.isnan(row[metric]["mean"])]
    return max(vals) if vals else math.nan


def n_flagged(records: Sequence[dict], metrics: Sequence[str] = HEADLINE, *, run_key: str = "run") -> float:
    """Number of flagged (category, group, metric) triples (NaN if no category has two groups)."""
    table = gap_table(records, run_key=run_key, metrics=tuple(metrics))
    if not any(len(ct["groups"]) > 1 for ct in table.values()):
        return math.nan
    return float(len(flags(table, metrics)))
