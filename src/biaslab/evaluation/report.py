"""The mitigation report (``report.html``) and console table, from the summary alone — one layout for every
method: the before / after / controls table with paired intervals, retention, the method's own sections, the
settings as a table, deviations and notes."""
from __future__ import annotations

from pathlib import Path

from ..formats import text_table  # noqa: F401  (re-exported: the console tables' one helper)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.1f}"


def _ci(c) -> str:
    return f"[{_f(c[0])}, {_f(c[1])}]" if c else "–"


def _pm(v, std) -> str:
    return _f(v) if std is None else f"{_f(v)} ± {_f(std)}"


def _vs_control(cm: dict) -> str:
    return f"{_f(cm.get('method_minus_control'))} {_ci(cm.get('method_minus_control_ci95'))}"


def _control_label(name: str, c: dict) -> str:
    n = len(c.get("members", []))
    return name + (f" (mean of {n})" if n > 1 else "")


def metric_rows(summary: dict, *, control_values: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per metric; per control its value (``control_values``) and the
    method − control difference with its paired interval."""
    controls = summary.get("controls", {})
    head = ["metric", "set", "before", "after", "Δ after − before (95% CI)", "verdict"]
    for name, c in controls.items():
        if control_values:
            head.append(_control_label(name, c))
        head.append(f"after − {name} (95% CI)")
    rows = []
    for name, m in summary["metrics"].items():
        row = [name, m.get("set", ""), _pm(m["before"], m.get("std_before")), _pm(m["after"], m.get("std_after")),
               f"{_f(m['delta'])} {_ci(m.get('delta_ci95'))}", m.get("verdict", "")]
        for c in controls.values():
            cm = c["metrics"].get(name, {})
            if control_values:
                row.append(_f(cm.get("after")))
            row.append(_vs_control(cm))
        rows.append(row)
    return head, rows


INLINE_CONTROLS = 2   # the console table holds this many controls' columns; more go to a table of their own
CONTROL_HEAD = ["metric", "control", "after − control (95% CI)"]


def control_rows(summary: dict) -> list[list[str]]:
    """The method − control differences as rows (metric, control, difference with its paired interval)."""
    rows = []
    for name in summary["metrics"]:
        for cname, c in (summary.get("controls") or {}).items():
            rows.append([name, _control_label(cname, c), _vs_control(c["metrics"].get(name, {}))])
    return rows


def retention_rows(summary: dict) -> list[list[str]]:
    rows = []
    for b, sec in ((summary.get("retention") or {}).get("benchmarks") or {}).items():
        for name, m in sec["metrics"].items():
            rows.append([b, name, _f(m["before"]), _f(m["after"]), f"{_f(m['delta'])} {_ci(m.get('delta_ci95'))}",
                         m.get("verdict", ""), _f(m.get("before_ci_width"))])
            if m.get("relative_change") is not None:
                rows.append([b, f"{name}, relative change", "", "", f"{_f(m['relative_change'])} "
                             f"{_ci(m.get('relative_change_ci95'))}", "", ""])
    return rows


RETENTION_HEAD = ["benchmark", "metric", "before", "after", "Δ (95% CI)", "verdict", "width of before's 95% CI"]


def policy_lines(summary: dict) -> list[str]:
    from ..signoff.policy import format_line

    pol = summary.get("policy")
    if not pol:
        return []
    return [f"policy {pol['policy']}: {pol['status']}"] + ["  " + format_line(r) for r in pol["rules"]
                                                          if r["status"] != "SKIP"]


def summary_tables(summary: dict, headline: str = ""):
    """Rich tables for the console: the metrics table (with more than ``INLINE_CONTROLS`` controls, their
    differences in a table of their own) and (when run) the retention table. Every name comes from the data, so
    cells are plain text (never read as markup)."""
    from rich.text import Text

    ev = summary["evaluation"]
    sizes = ", ".join(f"{k}: {v['n_items']}" for k, v in ev["sets"].items())
    controls = summary.get("controls") or {}
    wide = len(controls) > INLINE_CONTROLS
    head, rows = metric_rows({**summary, "controls": {}} if wide else summary, control_values=False)
    out = [text_table(f"{summary['method']} on {summary['task']}: {headline} ({sizes} items)", head, rows)]
    if wide:   # a column per control would fold every cell on an 80-column terminal: a row per metric × control
        out.append(text_table("after − control (95% CI): the method against each control", CONTROL_HEAD,
                              control_rows(summary)))
    rr = retention_rows(summary)
    if rr:
        out.append(text_table("retention", RETENTION_HEAD, rr))
    lines = policy_lines(summary)
    if lines:
        out.append(Text("\n".join(lines)))
    return out


_VERDICT_CLASS = {"better": "PASS", "worse": "FAIL", "overshot": "INCONCLUSIVE"}


def summary_panel(summary: dict) -> str:
    """One card per metric: before → after with the paired interval of the change, its verdict, and the change
    relative to each control; then the policy's overall status."""
    from ..report import esc

    cards = []
    for name, m in summary["metrics"].items():
        v = m.get("verdict", "")
        ctrl = "".join(f"<div class='note'>after − {esc(c)}: {_f(cm['metrics'][name].get('method_minus_control'))} "
                       f"{_ci(cm['metrics'][name].get('method_minus_control_ci95'))}</div>"
                       for c, cm in summary.get("controls", {}).items() if name in cm.get("metrics", {}))
        cards.append(f"<div class='card'><b>{esc(name)}</b> <span class='note'>{esc(m.get('set', ''))}</span>"
                     f"<div>{_f(m['before'])} → <b>{_f(m['after'])}</b></div><div>Δ {_f(m['delta'])} "
                     f"{_ci(m.get('delta_ci95'))} <span class='{_VERDICT_CLASS.get(v, '')}'>{esc(v)}</span></div>"
                     f"{ctrl}</div>")
    pol = summary.get("policy")
    status = (f"<p>Policy {esc(pol['policy'])}: <b class='{esc(pol['status'])}'>{esc(pol['status'])}</b> "
              f"({sum(r['status'] == 'PASS' for r in pol['rules'])} pass, "
              f"{sum(r['status'] == 'FAIL' for r in pol['rules'])} fail, "
              f"{sum(r['status'] == 'INCONCLUSIVE' for r in pol['rules'])} inconclusive)</p>") if pol else ""
    return status + f"<div class='panel'>{''.join(cards)}</div>"


def write_report(method, summary: dict, path) -> Path:
    from ..report import esc, run_footer, table, write_page

    ev = summary["evaluation"]
    head, rows = metric_rows(summary)
    sec = []
    if summary.get("notes"):
        sec.append(("Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in summary["notes"]) + "</ul>"))
    ctrl_desc = "".join(f"<li><b>{esc(k)}</b>: {esc(c['description'])}</li>" for k, c in summary["controls"].items())
    sets = "; ".join(f"{esc(k)}: {v['n_items']} items ({esc(v['protocol'])})" for k, v in ev["sets"].items())
    sec.append(("Before / after" + (" / controls" if summary["controls"] else "") + " (held-out evaluation sets)",
                table(head, rows) + f"<p class='note'>{sets}; {esc(ev['ci'])}; seed {ev['seed']}. ± = std over "
                                    "instructions where the set has several.</p>"
                + (f"<ul class='note'>{ctrl_desc}</ul>" if ctrl_desc else "")))
    rr = retention_rows(summary)
    if rr:
        sec.append(("Retention (other benchmarks, before / after)", table(RETENTION_HEAD, rr)))
    pol = summary.get("policy")
    if pol:
        from ..signoff.policy import format_line

        sec.insert(0, (f"Policy {pol['policy']}: {pol['status']}", "<pre>" + esc("\n".join(
            format_line(r) for r in pol["rules"])) + "</pre><p class='note'>PASS: the whole 95 % interval meets the "
            "rule; FAIL: none of it does; INCONCLUSIVE: the interval straddles the threshold; SKIP: not measured.</p>"))
    sec.insert(0, ("Summary", summary_panel(summary)))
    sec += method.report_sections(summary, Path(path).parent)
    cfg_rows = [[k, esc(v if not isinstance(v, (list, tuple)) else ", ".join(map(str, v)))]
                for k, v in summary.get("config", {}).items()]
    sec.append(("Settings", table(["setting", "value"], cfg_rows, raw=True)))
    if summary.get("deviations"):
        sec.append(("Deviations from the paper", "<ul>" + "".join(f"<li>{esc(d)}</li>" for d in summary["deviations"])
                    + "</ul>"))
    sec.append(("Timings (s)", table(["stage", "seconds"], [[k, v] for k, v in summary.get("timings_s", {}).items()])))
    sec.append(("Run directory", sub_run_links(Path(path).parent)))
    return write_page(path, f"biaslab {summary['method']} — {summary['task']}", sec,
                      subtitle=f"model {summary['model']['spec']} ({summary['model']['fingerprint'][:19]}…), "
                               f"{summary['method_version']}, summary schema {summary['schema']}",
                      footer=run_footer(_manifest(Path(path).parent)))


def _manifest(run_dir: Path) -> dict | None:
    import json

    try:
        return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sub_run_links(run_dir: Path) -> str:
    """Links to every nested state of the run (before, after, controls, retention audits): its report where it
    has one, else its results.json."""
    from ..report import esc

    items = []
    for res in sorted(run_dir.glob("**/results.json")):
        sub = res.parent
        if sub == run_dir:
            continue
        rel = sub.relative_to(run_dir).as_posix()
        target = "report.html" if (sub / "report.html").is_file() else "results.json"
        items.append(f"<li><a href='{esc(rel)}/{target}'>{esc(rel)}</a> <span class='note'>({target})</span></li>")
    files = [f for f in ("summary.json", "items.json", "patch.safetensors", "manifest.json") if (run_dir / f).is_file()]
    return ("<ul>" + "".join(items) + "</ul>" if items else "") + \
        "<p class='note'>" + ", ".join(f"<a href='{f}'>{f}</a>" for f in files) + "</p>"


def render_summary(summary: dict, fmt: str, headline: str = "") -> str:
    """A mitigation's results as ``markdown`` (the metrics and retention tables, the policy lines), ``csv`` (one
    row per metric: set, before, after, delta and its interval, verdict) or ``json`` (the summary)."""
    import json

    from ..formats import check_format, csv_table, markdown_table

    check_format(fmt, ("markdown", "csv", "json"))
    if fmt == "json":
        return json.dumps(summary, indent=2) + "\n"
    if fmt == "csv":
        head = ["scope", "metric", "before", "after", "delta", "delta_lo", "delta_hi", "verdict"]
        rows = []
        for name, m in summary["metrics"].items():
            ci = m.get("delta_ci95") or [None, None]
            rows.append([m.get("set", "task"), name, m["before"], m["after"], m["delta"], ci[0], ci[1], m.get("verdict")])
        for b, sec in ((summary.get("retention") or {}).get("benchmarks") or {}).items():
            for name, m in sec["metrics"].items():
                ci = m.get("delta_ci95") or [None, None]
                rows.append([f"retention:{b}", name, m["before"], m["after"], m["delta"], ci[0], ci[1], m.get("verdict")])
        return csv_table(head, rows)
    sizes = ", ".join(f"{k}: {v['n_items']}" for k, v in summary["evaluation"]["sets"].items())
    out = f"**{summary['method']} on {summary['task']}**: {headline} ({sizes} items)\n\n"
    out += markdown_table(*metric_rows(summary))
    rr = retention_rows(summary)
    if rr:
        out += "\n**retention**\n\n" + markdown_table(RETENTION_HEAD, rr)
    lines = policy_lines(summary)
    if lines:
        out += "\n" + "\n".join(f"- {ln.strip()}" for ln in lines) + "\n"
    return out
