"""``biaslab compare RUN…``: runs side by side on the same benchmarks — audits, mitigation runs (their ``after`` state
and retention audit), or single states of a run (``DIR/before``, ``DIR/after``, ``DIR/controls/<name>/<member>``).

Each metric gets its value with a 95 % bootstrap interval per run, and its difference from the first run: a paired
bootstrap where both runs scored the same items, an unpaired one (each side resampled on its own) where they did
not — and the table says which.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import stats
from ..errors import BiaslabError

FORMATS = ("table", "markdown", "csv", "json")


@dataclass
class RunView:
    """One column of a comparison: records and metrics by scope (a benchmark or an evaluation set)."""
    name: str
    path: Path
    records: dict[str, list[dict]] = field(default_factory=dict)
    metrics: dict[str, list] = field(default_factory=dict)   # scope -> MetricSpec / MetricDef (name, fn)
    protocols: dict[str, str] = field(default_factory=dict)


def _read_results(p: Path) -> dict:
    f = p / "results.json"
    if not f.is_file():
        raise BiaslabError(f"{p} holds no results.json: not a biaslab run (or state) directory")
    doc = json.loads(f.read_text(encoding="utf-8"))
    if doc.get("complete") is False:
        raise BiaslabError(f"{f} belongs to a run that did not finish; rerun it before comparing it")
    return doc


def _audit_view(p: Path, name: str, into: RunView | None = None) -> RunView:
    from ..benchmarks import get_benchmark
    from ..runs import read_records

    res = _read_results(p)
    v = into or RunView(name, p)
    for b, sec in res["benchmarks"].items():
        bench = get_benchmark(b)
        proto = next((x for x in bench.protocols if x.id == sec["protocol"]), None)
        if proto is None:
            raise BiaslabError(f"{p}: benchmark {b} was scored under protocol {sec['protocol']}, which this biaslab "
                               "does not know")
        v.records[b] = read_records(p, b)
        v.metrics[b] = [m for m in bench.metric_defs(proto) if m.headline]
        v.protocols[b] = proto.id
    return v


def _run_root(p: Path) -> Path | None:
    for q in (p, *p.parents):
        if (q / "summary.json").is_file() or (q / "fit").is_dir():
            return q
    return None


def _state_view(p: Path, name: str) -> RunView:
    from ..evaluation.runner import get_method
    from ..runs import read_records

    res = _read_results(p)
    root = _run_root(p.parent)
    if root is None:
        raise BiaslabError(f"{p} is a state directory whose mitigation run cannot be found above it")
    man = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    args = man["args"]
    method = get_method(args["method"])
    cfg = method.make_config({k: v for k, v in args["config"].items() if k in
                              {f.name for f in method.config_fields()}})
    spec = man.get("task_spec", args["task"])   # a file task reloads from its path (older runs: only the name)
    try:
        task = method.load_task(spec, cfg)
    except BiaslabError as e:
        raise BiaslabError(f"{root}: cannot load the run's task {args['task']} again to recompute its metrics "
                           f"({e})") from None
    if task.name != args["task"]:
        raise BiaslabError(f"{root}: the run's task was {args['task']}, but {spec} now holds {task.name}: the file "
                           "changed since the run, so its records cannot be matched to its items")
    specs = method.metrics_for(task, cfg)
    if specs is None:
        raise BiaslabError(f"{p}: method {method.name} cannot list its metrics without a model, so its states "
                           "cannot be compared; compare its summaries instead")
    refs = method.references_for(task, cfg)   # e.g. FAST's RS reads the before state's preference
    v = RunView(name, p)
    for s, sec in res["sets"].items():
        v.records[s] = read_records(p, s)
        if s in refs:
            v.records[s] = refs[s](v.records[s], read_records(root / "before", s))
        v.metrics[s] = specs[s]
        v.protocols[s] = sec["protocol"]
    return v


def load_view(path) -> RunView:
    p = Path(path)
    if not p.is_dir():
        raise BiaslabError(f"{p} is not a run directory")
    if (p / "summary.json").is_file():   # a mitigation run: its after state and retention audit
        v = _state_view(p / "after", str(p))
        if (p / "retention" / "after").is_dir():
            _audit_view(p / "retention" / "after", str(p), into=v)
        return v
    res = _read_results(p)
    if "benchmarks" not in res and "sets" not in res:   # a probe's or a rewrite's run directory
        raise BiaslabError(f"{p} is neither an audit, a mitigation nor one of its states (a soft-prompt probe or a "
                           "rewrite run?): biaslab compare reads those")
    return _audit_view(p, str(p)) if "benchmarks" in res else _state_view(p, str(p))


def compare_runs(paths, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{runs, rows[{scope, metric, protocol, values[{run, value, ci95}], deltas[{run, delta, delta_ci95, paired}]}],
    leaderboard[{run, scope.metric: value}]} for two or more runs."""
    if len(paths) < 2:
        raise BiaslabError("compare needs two or more run directories")
    views = [load_view(p) for p in paths]
    ref = views[0]
    scopes = [s for s in ref.records if all(s in v.records for v in views[1:])]
    if not scopes:
        raise BiaslabError("the runs share no benchmark or evaluation set: nothing to compare")
    rows = []
    for s in scopes:
        protos = {v.protocols.get(s) for v in views}
        for m in ref.metrics[s]:
            vals = []
            for v in views:
                b = stats.bootstrap_ci(v.records[s], m.fn, n_boot=n_boot, seed=seed)
                vals.append({"run": v.name, "value": b["value"], "ci95": b["ci95"]})
            deltas = []
            ref_ids = {r["id"] for r in ref.records[s]}
            for v in views[1:]:
                paired = {r["id"] for r in v.records[s]} == ref_ids
                fn = stats.paired_bootstrap if paired else stats.unpaired_bootstrap
                d = fn(ref.records[s], v.records[s], m.fn, n_boot=n_boot, seed=seed)
                deltas.append({"run": v.name, "delta": d["delta"], "delta_ci95": d["delta_ci95"], "paired": paired})
            rows.append({"scope": s, "metric": m.name, "protocol": protos.pop() if len(protos) == 1 else
                         " / ".join(sorted(map(str, protos))), "values": vals, "deltas": deltas,
                         "protocols_differ": len({v.protocols.get(s) for v in views}) > 1})
    board = [{"run": v.name, **{f"{r['scope']}.{r['metric']}": r["values"][k]["value"] for r in rows}}
             for k, v in enumerate(views)]
    from ..runs import clean_nan

    return clean_nan({"runs": [v.name for v in views], "reference": ref.name, "n_boot": n_boot, "seed": seed,
                      "rows": rows, "leaderboard": board})


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(c) -> str:
    return f"[{_f(c[0])}, {_f(c[1])}]" if c else "–"


def table_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    runs = res["runs"]
    head = ["scope", "metric"] + [f"run {k + 1}" for k in range(len(runs))] + [f"run {k + 2} − run 1"
                                                                              for k in range(len(runs) - 1)]
    rows = []
    for r in res["rows"]:
        row = [r["scope"], r["metric"]] + [f"{_f(v['value'])} {_ci(v['ci95'])}" for v in r["values"]]
        row += [f"{_f(d['delta'])} {_ci(d['delta_ci95'])} ({'paired' if d['paired'] else 'unpaired'})"
                for d in r["deltas"]]
        rows.append(row)
    return head, rows


def render(res: dict, fmt: str) -> str:
    if fmt not in FORMATS:
        raise BiaslabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return json.dumps(res, indent=2)
    head, rows = table_rows(res)
    legend = "\n".join(f"run {k + 1}: {r}" for k, r in enumerate(res["runs"]))
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["scope", "metric", "run", "value", "ci_lo", "ci_hi", "delta_vs_run1", "delta_lo", "delta_hi",
                    "paired"])
        for r in res["rows"]:
            for k, v in enumerate(r["values"]):
                d = r["deltas"][k - 1] if k else {}
                ci, dci = v["ci95"] or [None, None], d.get("delta_ci95") or [None, None]
                w.writerow([r["scope"], r["metric"], v["run"], v["value"], ci[0], ci[1], d.get("delta"), dci[0],
                            dci[1], d.get("paired")])
        return buf.getvalue()
    # markdown (also the plain-text table)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + legend + "\n"


def write_html(res: dict, path) -> Path:
    from ..report import esc, table, write_page

    head, rows = table_rows(res)
    board_head = ["run"] + [k for k in res["leaderboard"][0] if k != "run"]
    board = [[b["run"]] + [_f(b[k]) for k in board_head[1:]] for b in res["leaderboard"]]
    legend = "".join(f"<li>run {k + 1}: <code>{esc(r)}</code></li>" for k, r in enumerate(res["runs"]))
    return write_page(path, "biaslab compare", [
        ("Runs", f"<ul>{legend}</ul>"),
        ("Leaderboard (value per run)", table(board_head, board)),
        ("Metrics with 95 % intervals; differences from run 1", table(head, rows) +
         "<p class='note'>paired: both runs scored the same items (paired bootstrap); unpaired: other items, each "
         "side resampled on its own.</p>")])
