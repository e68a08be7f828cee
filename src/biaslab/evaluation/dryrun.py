"""``--dry-run``: what a run would score — items per benchmark and stage — and an estimated time, from a few
seconds of calibration on the loaded model (the first items of each set scored once, timed, nothing written).

The estimate is the calibration's seconds per item times the items of every state; it is rough (the first items
may be shorter or longer than the rest, and packing gains grow with the chunk), and a method's fit is not
estimated: its length depends on its own search. Under N processes every rank calibrates, and the estimate is the
busiest rank's share of each set (its chunks dealt out in rounds, as :mod:`biaslab.distributed` deals them) at
the slowest rank's speed. Nothing is written to disk."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

CALIBRATION_S = 3.0     # per set, at most about this long (after one warm-up item)
CALIBRATION_ITEMS = 16


@dataclass
class DryRun:
    """Rows: (stage, set or benchmark, items, seconds per item, estimated seconds)."""
    title: str
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def total_s(self) -> float:
        return sum(r[4] for r in self.rows if r[4] is not None)

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        from ..progress import fmt_seconds

        head = ["stage", "set", "items", "s / item (calibrated)", "estimated time"]
        rows = [[st, name, f"{n:,}", "–" if spi is None else f"{spi:.3f}", "not estimated" if est is None
                 else fmt_seconds(est)] for st, name, n, spi, est in self.rows]
        rows.append(["total", "", f"{sum(r[2] for r in self.rows):,}", "", fmt_seconds(self.total_s())])
        return head, rows

    def render(self, fmt: str = "table") -> str:
        import json

        from ..formats import check_format, csv_table, markdown_table

        check_format(fmt)
        if fmt == "json":
            return json.dumps({"title": self.title, "rows": [dict(zip(("stage", "set", "items", "s_per_item",
                                                                         "estimated_s"), r)) for r in self.rows],
                               "total_s": self.total_s(), "notes": self.notes}, indent=2) + "\n"
        head, rows = self.table_rows()
        if fmt == "csv":
            return csv_table(["stage", "set", "items", "s_per_item", "estimated_s"], self.rows)
        return f"**{self.title}**\n\n" + markdown_table(head, rows) + "".join(f"\n- {n}" for n in self.notes) + "\n"


def seconds_per_item(score, items: list) -> float | None:
    """Time ``score(items[a:b])`` on the first items: one warm-up item, then growing batches for about
    :data:`CALIBRATION_S` seconds or :data:`CALIBRATION_ITEMS` items. Under several processes each rank times its
    own and the slowest counts (a round of chunks lasts as long as its slowest rank)."""
    from .. import distributed as D

    local = _local_seconds_per_item(score, items)
    if D.world_size() <= 1:
        return local
    return max((v for v in D.all_gather(local) if v is not None), default=None)


def estimated_s(spi: float | None, n: int, chunk: int | None) -> float | None:
    """Seconds for ``n`` items at ``spi`` seconds each: ``spi * n`` in one process; under W processes the busiest
    rank's share — round r scores chunks r·W … r·W+W−1 (chunk k to rank k mod W) and lasts as long as its
    fullest chunk."""
    from .. import distributed as D

    W = D.world_size()
    if spi is None:
        return None
    if W <= 1 or not chunk:
        return spi * n
    return spi * sum(min(chunk, n - start) for start in range(0, n, chunk * W))


def _local_seconds_per_item(score, items: list) -> float | None:
    from ..progress import quieted

    if not items:
        return None
    with quieted():
        score(items[:1])
        done, spent, k = 1, 0.0, 1
        while done < min(len(items), CALIBRATION_ITEMS + 1) and spent < CALIBRATION_S:
            part = items[done:done + k]
            t = time.perf_counter()
            score(part)
            spent += time.perf_counter() - t
            done += len(part)
            k *= 2
    n = done - 1
    return spent / n if n else spent


def audit_plan(lm, benches: dict, protos: dict, items: dict, *, title: str, stage: str = "audit") -> DryRun:
    plan = DryRun(title)
    for n, b in benches.items():
        spi = seconds_per_item(lambda part, b=b, n=n: b.score(lm, part, protocol=protos[n]), items[n])
        plan.rows.append([stage, n, len(items[n]), spi, estimated_s(spi, len(items[n]), b.chunk_size)])
    _note_processes(plan)
    return plan


def _note_processes(plan: DryRun) -> None:
    from .. import distributed as D

    if D.world_size() > 1:
        plan.notes.append(f"{D.world_size()} processes: s / item is the slowest rank's, calibrated on every rank; the "
                          f"time is the busiest rank's share of each set's chunks")


def mitigation_plan(m, lm, task_data, cfg, *, limit, seed) -> DryRun:
    """Items per stage of a mitigation run: before, after, the scored control states, retention before / after."""
    from ..benchmarks import get_benchmark

    plan = DryRun(f"dry run: {m.name} on {task_data.name} ({lm.spec})")
    plan.rows.append(["fit", task_data.name, 0, None, None])
    plan.notes.append("the fit is not estimated: its length depends on the method's own search")
    sets = m.evaluation(lm, task_data, cfg, None, limit=limit, seed=seed)
    n_ctrl = m.planned_control_states(cfg)
    if n_ctrl is None:
        plan.notes.append("control states are known only after the fit; not counted")
        n_ctrl = 0
    for s in sets:
        spi = seconds_per_item(lambda part, s=s: s.score(lm, part), s.items)
        for stage, k in (("before", 1), ("after", 1), (f"controls ({n_ctrl} scored states)", n_ctrl)):
            if k:
                est = estimated_s(spi, len(s.items), s.chunk)
                plan.rows.append([stage, s.name, k * len(s.items), spi, None if est is None else k * est])
    rp = m.retention(cfg)
    if rp is not None and rp.benchmarks:
        for bname in rp.benchmarks:
            b = get_benchmark(bname)
            proto = b.protocol()
            its = b.sample(b.load_items(), rp.limit, seed)
            spi = seconds_per_item(lambda part, b=b, proto=proto: b.score(lm, part, protocol=proto), its)
            est = estimated_s(spi, len(its), b.chunk_size)
            plan.rows.append(["retention before + after", bname, 2 * len(its), spi, None if est is None else 2 * est])
    _note_processes(plan)
    plan.notes.append("estimates are the calibration's seconds per item times the items; packing and caching make "
                      "long runs somewhat faster per item")
    return plan
