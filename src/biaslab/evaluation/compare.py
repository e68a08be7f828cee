"""Comparisons of model states: paired-bootstrap deltas of every metric (after vs before, after vs each control)
and the retention audit before / after a patch. One implementation for every method.

Intervals are 95 % percentile intervals of a paired cluster bootstrap over items (:func:`biaslab.stats.
paired_bootstrap`): every resample takes the same items on both sides, all records of an item (its
instructions, a pooled control's members) together.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .. import stats
from .plan import MetricSpec

CI_NOTE = "paired bootstrap over items (all records of an item resampled together), 95 %"


def instructions_of(records: Sequence[dict]) -> list:
    return sorted({r.get("instruction", 0) for r in records})


def std_over_instructions(records: Sequence[dict], spec: MetricSpec) -> float | None:
    """Sample std of the metric across instructions (None when the records have one instruction)."""
    instr = instructions_of(records)
    if len(instr) < 2:
        return None
    per = [stats._safe(spec.fn, [r for r in records if r.get("instruction", 0) == i]) for i in instr]
    return stats.mean_std(per)[1]


def state_metrics(records: Sequence[dict], specs: Sequence[MetricSpec], *, n_boot: int, seed: int) -> dict:
    """{metric: value, ci95 (cluster bootstrap), std over instructions} of one state's records."""
    out = {}
    for m in specs:
        b = stats.bootstrap_ci(records, m.fn, n_boot=n_boot, seed=seed)
        out[m.name] = {**b, "std_over_instructions": std_over_instructions(records, m), "scale": m.scale}
    return out


def _paired(a, b, spec, n_boot, seed) -> dict:
    r = stats.paired_bootstrap(a, b, spec.fn, n_boot=n_boot, seed=seed)
    return {k: r[k] for k in ("before", "after", "delta", "delta_ci95", "p", "n_items")}


def with_verdict(block: dict, before, after, spec: MetricSpec, *, n_boot: int, seed: int) -> dict:
    """``block`` with, for an ideal-valued metric, the paired change of |value − ideal|, and the verdict
    (:mod:`biaslab.signoff.verdicts`)."""
    from ..signoff.verdicts import distance_fn, verdict

    if spec.direction == "ideal":
        d = stats.paired_bootstrap(before, after, distance_fn(spec.fn, spec.ideal), n_boot=n_boot, seed=seed)
        block["distance_to_ideal"] = {k: d[k] for k in ("before", "after", "delta", "delta_ci95")}
    block["verdict"] = verdict(block)
    return block


def compare_metric(before: Sequence[dict], after: Sequence[dict], spec: MetricSpec, set_name: str, *,
                   n_boot: int, seed: int) -> dict:
    """The summary's metric block: before, after, delta with its paired interval, p, the metric's meaning and the
    verdict."""
    block = {"set": set_name, **_paired(before, after, spec, n_boot, seed), **spec.describe()}
    sb, sa = std_over_instructions(before, spec), std_over_instructions(after, spec)
    if sb is not None or sa is not None:
        block["std_before"], block["std_after"] = sb, sa
    return with_verdict(block, before, after, spec, n_boot=n_boot, seed=seed)


def pool_members(member_records: Sequence[Sequence[dict]]) -> list[dict]:
    """A control's member states as one record list, each record tagged with its member index."""
    return [{**r, "control_member": k} for k, recs in enumerate(member_records) for r in recs]


def compare_control(before: Sequence[dict], after: Sequence[dict], members: Sequence[Sequence[dict]],
                    spec: MetricSpec, set_name: str, *, n_boot: int, seed: int) -> dict:
    """The control's metric block: control vs before (before/after/delta), and the method's patch vs the control
    (``method_minus_control`` with its paired interval); per-member values."""
    pooled = pool_members(members)
    vs_before = _paired(before, pooled, spec, n_boot, seed)
    method_vs = _paired(pooled, after, spec, n_boot, seed)
    block = {"set": set_name, **vs_before, "method_minus_control": method_vs["delta"],
             "method_minus_control_ci95": method_vs["delta_ci95"], "method_minus_control_p": method_vs["p"],
             "per_member": [stats._safe(spec.fn, rs) for rs in members], **spec.describe()}
    stds = [std_over_instructions(rs, spec) for rs in members]
    if any(s is not None for s in stds):
        block["per_member_std"] = stds
    return with_verdict(block, before, pooled, spec, n_boot=n_boot, seed=seed)


def retention_comparison(lm, patch, benchmarks: Sequence[str], *, limit: int | None, seed: int, n_boot: int,
                         out=None, force: bool = False, steps: tuple[str, str] = ("retention before", "retention after")) -> dict:
    """Headline metrics of other benchmarks before / after ``patch``: paired-bootstrap CI of each delta, the width
    of the unpatched model's own 95 % CI (retention criterion: |Δ| within that width), and for perplexity the
    relative change with its interval (the paired bootstrap of log perplexity, mapped through exp − 1)."""
    from pathlib import Path

    from ..auditing import audit
    from ..benchmarks import get_benchmark

    out = Path(out) if out is not None else None
    from ..progress import stage_prefix

    with stage_prefix(steps[0]):
        rb = audit(lm, list(benchmarks), limit=limit, seed=seed, out=out / "before" if out else None, force=force,
                   n_boot=n_boot)
    with stage_prefix(steps[1]):
        ra = audit(lm, list(benchmarks), limit=limit, seed=seed, patch=patch, out=out / "after" if out else None,
                   force=force, n_boot=n_boot)
    res = {}
    for bname in benchmarks:
        bench = get_benchmark(bname)
        sec = rb.results["benchmarks"][bname]
        proto = bench.protocol(sec["protocol"])
        res[bname] = {"protocol": proto.id, "n_items": sec["n_items"], "metrics": {}}
        for mdef in bench.metric_defs(proto):
            if not mdef.headline:
                continue
            spec = MetricSpec(mdef.name, mdef.fn, mdef.description, mdef.scale,
                              "ideal" if mdef.ideal is not None else retention_direction(mdef.name), mdef.ideal)
            b, a = rb.records[bname], ra.records[bname]
            r = _paired(b, a, spec, n_boot, seed)
            ci = sec["metrics"][mdef.name].get("ci95")
            width = (ci[1] - ci[0]) if ci else None
            block = {**r, "before_ci95": ci, "after_ci95": ra.results["benchmarks"][bname]["metrics"][mdef.name].get("ci95"),
                     "before_ci_width": width, **spec.describe(),
                     "within_ci_width": (abs(r["delta"]) <= width) if width is not None and r["delta"] == r["delta"] else None}
            if mdef.name == "perplexity" and r["before"]:
                block.update(relative_change(b, a, mdef.fn, n_boot=n_boot, seed=seed))
            res[bname]["metrics"][mdef.name] = with_verdict(block, b, a, spec, n_boot=n_boot, seed=seed)
    return res


def retention_direction(metric: str) -> str:
    return "lower" if metric in ("perplexity",) else "higher"


def relative_change(before, after, fn, *, n_boot: int, seed: int) -> dict:
    """after / before − 1 of a positive metric (perplexity) with its paired interval (log scale, monotone map)."""
    def log_of(recs):
        v = fn(recs)
        return math.log(v) if v and not math.isnan(v) else math.nan

    vb, va = fn(before), fn(after)
    r = stats.paired_bootstrap(before, after, log_of, n_boot=n_boot, seed=seed)
    ci = r.get("delta_ci95")
    return {"relative_change": va / vb - 1 if vb else None,
            "relative_change_ci95": [math.expm1(ci[0]), math.expm1(ci[1])] if ci else None}


def score_mc_resumable(lm, items, instructions, *, protocol: str, run=None, key: str = "task", patch=None,
                       chunk: int = 32, desc: str = "test") -> list[dict]:
    """Multiple-choice records of ``items`` × ``instructions`` under an optional patch, through ``run``'s journal
    (the runner's scoring of a CRISPR task state, for scripts that score extra items or instructions)."""
    import contextlib

    from ..runs import score_journaled
    from ..tasks import score_mc

    ctx = patch.applied(lm) if patch is not None else contextlib.nullcontext()
    with ctx:
        return score_journaled(run, key, list(items), chunk,
                               lambda part: score_mc(lm, part, list(instructions), protocol=protocol, desc=desc))
