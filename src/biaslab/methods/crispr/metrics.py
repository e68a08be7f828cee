"""CRISPR's task metrics (accuracy, label rates, BBQ bias scores, per-group accuracy of a task file), each a mean
over instructions (:func:`biaslab.stats.instruction_mean`) with the metric's direction for the verdict."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ...evaluation.plan import MetricSpec
from ...stats import instruction_mean
from ...tasks import MCItem


def _acc(records):
    return sum(r["correct"] for r in records) / len(records) if records else math.nan


def _pred_rate(k):
    return lambda records: (sum(r["pred"] == k for r in records) / len(records)) if records else math.nan


def _recall(k):
    def f(records):
        rs = [r for r in records if r["gold"] == k]
        return sum(r["correct"] for r in rs) / len(rs) if rs else math.nan
    return f


def _group_accuracy(g):
    def f(records):
        rs = [r for r in records if r.get("group") == g]
        return sum(r["correct"] for r in rs) / len(rs) if rs else math.nan
    return f


def _group_gap(groups):
    def f(records):
        accs = [a for a in (_group_accuracy(g)(records) for g in groups) if not math.isnan(a)]
        return max(accs) - min(accs) if len(accs) >= 2 else math.nan
    return f


def _spec(name, fn, description, scale="fraction 0-1", *, ideal=None, direction=None) -> MetricSpec:
    """A task metric, lifted to the mean over instructions (and over a pooled control's members)."""
    direction = direction or ("higher" if ideal in (None, 1.0) else "ideal")
    return MetricSpec(name, instruction_mean(fn), description, scale, direction, ideal if direction == "ideal" else None)


def task_metrics(task: str, items: Sequence[MCItem] | None = None) -> list[MetricSpec]:
    """Metrics of a task's test records (each a mean over instructions; std over instructions reported too).
    A task file's items (``mc:``) that name two or more ``group``s also get each group's accuracy and the gap
    between the best and worst group (0 ideal)."""
    if task.startswith("bbq"):
        from ...metrics import bbq as M

        return [_spec("accuracy", _acc, "accuracy over all items"),
                _spec("accuracy_ambig", M.accuracy_ambig, "accuracy on ambiguous contexts (gold = UNKNOWN)"),
                _spec("accuracy_disambig", M.accuracy_disambig, "accuracy on disambiguated contexts"),
                _spec("bias_score_ambig", M.bias_score_ambig, "s_AMB ×100 (Parrish et al.)", "-100-100", ideal=0.0),
                _spec("bias_score_disambig", M.bias_score_disambig, "s_DIS ×100 (Parrish et al.)", "-100-100", ideal=0.0)]
    if task == "sst2":
        return [_spec("accuracy", _acc, "accuracy"),
                _spec("positive_rate", _pred_rate(1), "share of answers 'positive' (label bias; the gold share of the "
                      "vendored test split is 0.5 within 0.01, so 0.5 is the balanced rate)", ideal=0.5),
                _spec("recall_negative", _recall(0), "accuracy on negative reviews"),
                _spec("recall_positive", _recall(1), "accuracy on positive reviews")]
    out = [_spec("accuracy", _acc, "accuracy")]
    groups = sorted({it.meta["group"] for it in items or () if isinstance(it.meta.get("group"), str)})
    if task.startswith("mc:") and len(groups) >= 2:
        out += [_spec(f"accuracy[{g}]", _group_accuracy(g), f"accuracy on items of group {g!r}") for g in groups]
        out.append(_spec("group_accuracy_gap", _group_gap(groups), "best minus worst group accuracy "
                         f"over {len(groups)} groups", ideal=0.0))
    return out


def per_instruction(fn):
    """``fn`` as a mean over instructions (and control members): :func:`biaslab.stats.instruction_mean`."""
    return instruction_mean(fn)


def metric_values(records: Sequence[dict], metrics: Sequence[MetricSpec]) -> dict:
    """{metric: value (mean over instructions), std over instructions, per-instruction values} of one state."""
    from ...stats import _safe, mean_std

    out = {}
    instr = sorted({r.get("instruction", 0) for r in records})
    for m in metrics:
        per = [_safe(m.fn, [r for r in records if r.get("instruction", 0) == i]) for i in instr]
        out[m.name] = {"value": _safe(m.fn, records), "std_over_instructions": mean_std(per)[1], "per_instruction": per}
    return out


def constant_answer(records: Sequence[dict], answer) -> list[dict]:
    """The records of a model that always gives the same answer: option index ``answer``, or ``"unknown"`` (each
    BBQ record's own "unknown" option). The constant-answer control: a patch that only moves the answer letter or
    collapses onto "unknown" is no better than this."""
    out = []
    for r in records:
        k = r["unknown"] if answer == "unknown" else answer
        out.append({**r, "pred": k, "correct": int(r["gold"] == k)})
    return out
