"""What an audit returns: :class:`AuditResult` — the results dict, the raw records, a tidy DataFrame
(:meth:`AuditResult.to_frame`), a fairlearn-like by-group view (:meth:`AuditResult.by_group`, with
``difference()`` and ``ratio()`` as fairlearn's ``MetricFrame`` defines them) and a readable table
(``print(result)``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SMALL_N = 20   # groups with fewer items are marked small-n: their intervals are too wide (or degenerate) to read


def fmt_value(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def fmt_interval(ci) -> str:
    return f"[{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else "–"


@dataclass
class ByGroup:
    """One metric of one benchmark, by group (fairlearn's ``MetricFrame.by_group`` for one metric).

    ``frame``: group, value, lo, hi, n, small_n. ``difference()`` / ``ratio()``: fairlearn's ``between_groups``
    method — the largest group value minus the smallest, and the smallest over the largest. Neither carries an
    interval: a bootstrap of a max-minus-min over groups is biased upward (see ``MetricDef.ci_method``)."""
    benchmark: str
    metric: str
    frame: object  # pandas.DataFrame

    def _values(self, include_small: bool):
        f = self.frame if include_small else self.frame[~self.frame["small_n"]]
        return f["value"].dropna()

    def difference(self, *, include_small: bool = True) -> float:
        v = self._values(include_small)
        return float(v.max() - v.min()) if len(v) else float("nan")

    def ratio(self, *, include_small: bool = True) -> float:
        """min / max of the group values (fairlearn's convention; NaN if the largest is 0 or values change sign)."""
        v = self._values(include_small)
        if not len(v) or v.max() == 0 or (v.min() < 0 < v.max()):
            return float("nan")
        lo, hi = sorted((abs(v.min()), abs(v.max())))
        return float(lo / hi)

    def __str__(self) -> str:
        return self.frame.to_string(index=False)


@dataclass
class AuditResult:
    results: dict
    records: dict[str, list[dict]] = field(default_factory=dict)
    path: Path | None = None

    def metric(self, bench: str, name: str, group: str | None = None) -> float | None:
        sec = self.results["benchmarks"][bench]
        if group is not None:
            sec = sec["groups"][group]
        return sec["metrics"][name]["value"]

    # ------------------------------------------------------------------ tidy views
    def rows(self) -> list[dict]:
        """One dict per (benchmark, group, metric): overall rows have group ``"all"``."""
        out = []
        for b, sec in self.results["benchmarks"].items():
            scopes = [("all", sec["n_items"], sec["metrics"])]
            scopes += [(g, gs["n_items"], gs["metrics"]) for g, gs in sec.get("groups", {}).items()]
            for g, n, metrics in scopes:
                for name, m in metrics.items():
                    ci = m.get("ci95") or [None, None]
                    out.append({"benchmark": b, "protocol": sec["protocol"], "group": g, "metric": name,
                                "value": m.get("value"), "lo": ci[0], "hi": ci[1], "n": n,
                                "small_n": g != "all" and n < SMALL_N})
        return out

    def to_frame(self):
        """A tidy pandas DataFrame: benchmark, protocol, group, metric, value, lo, hi, n, small_n."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=["benchmark", "protocol", "group", "metric", "value", "lo", "hi",
                                                  "n", "small_n"])

    def by_group(self, bench: str, metric: str) -> ByGroup:
        from .errors import BiaslabError

        f = self.to_frame()
        if bench not in self.results["benchmarks"]:
            raise BiaslabError(f"this audit has no benchmark {bench!r}; it has {', '.join(self.results['benchmarks'])}")
        f = f[(f["benchmark"] == bench) & (f["group"] != "all")]
        if metric not in set(f["metric"]):
            names = sorted(self.results["benchmarks"][bench]["metrics"])
            raise BiaslabError(f"{bench} has no by-group metric {metric!r}; it has {', '.join(names)}")
        f = f[f["metric"] == metric][["group", "value", "lo", "hi", "n", "small_n"]].reset_index(drop=True)
        return ByGroup(bench, metric, f)

    # ------------------------------------------------------------------ console
    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["benchmark", "protocol", "metric", "value", "95% CI", "± std (instr.)", "n"]
        rows = []
        for b, sec in self.results["benchmarks"].items():
            for name, m in sec["metrics"].items():
                rows.append([b, sec["protocol"], name, fmt_value(m.get("value")), fmt_interval(m.get("ci95")),
                             fmt_value(m["std"]) if m.get("std") is not None else "", str(sec["n_items"])])
        return head, rows

    def title(self) -> str:
        return f"biaslab audit — {self.results['model']['spec']}" + (" + patch" if self.results.get("patch") else "")

    def table(self):
        """A rich table (cells are plain text, long names fold instead of being cut)."""
        from .formats import text_table

        return text_table(self.title(), *self.table_rows())

    def render(self, fmt: str = "table") -> str:
        """The results as ``table`` (plain text), ``markdown``, ``csv`` (the tidy rows) or ``json``."""
        import json

        from .formats import check_format, csv_table, markdown_table

        check_format(fmt)
        if fmt == "json":
            return json.dumps(self.results, indent=2) + "\n"
        if fmt == "csv":
            rows = self.rows()
            head = list(rows[0]) if rows else ["benchmark", "group", "metric", "value", "lo", "hi", "n"]
            return csv_table(head, [[r[h] for h in head] for r in rows])
        if fmt == "markdown":
            return f"**{self.title()}**\n\n" + markdown_table(*self.table_rows())
        import io

        from rich.console import Console

        con = Console(width=160, file=io.StringIO(), color_system=None)
        con.print(self.table())
        return con.file.getvalue()

    def __str__(self) -> str:
        return self.render("table")

    def __repr__(self) -> str:
        b = ", ".join(self.results["benchmarks"])
        return f"AuditResult(model={self.results['model']['spec']!r}, benchmarks=[{b}], path={self.path})"
