"""The audit report (``report.html``): a summary panel first (per benchmark its headline metric, interval and the
release policy's verdict), then per-group forest plots with their 95 % intervals, then the tables.

Groups with fewer than :data:`~biaslab.audit_result.SMALL_N` items are marked small-n: drawn as a hollow grey point
without an interval bar (their bootstrap intervals are degenerate or too wide to read), and flagged in the tables."""
from __future__ import annotations

from pathlib import Path

from ..audit_result import SMALL_N
from . import esc, fmt, fmt_ci, figure, run_footer, table, write_page


def _headline_names(bench_name: str, sec: dict) -> list[str]:
    """The benchmark's headline metrics (as it declares them), in its order; all metrics if it is unknown."""
    try:
        from ..benchmarks import get_benchmark

        b = get_benchmark(bench_name)
        names = [d.name for d in b.metric_defs(b.protocol(sec["protocol"])) if d.headline]
    except Exception:   # a results.json from another version: show what it holds
        names = []
    return [n for n in names if n in sec["metrics"]] or list(sec["metrics"])


def forest_plot(bench: str, sec: dict, metric: str):
    """One metric by group: point estimate and 95 % interval per group; small-n groups hollow, no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(sec.get("groups", {}).items())
    fig, ax = plt.subplots(figsize=(6.4, 0.34 * len(groups) + 1.2))
    for y, (g, gs) in enumerate(reversed(groups)):
        m = gs["metrics"].get(metric, {})
        v, ci, small = m.get("value"), m.get("ci95"), gs["n_items"] < SMALL_N
        if v is None:
            continue
        if small:
            ax.plot([v], [y], "o", mfc="white", mec="#999", zorder=3)
        else:
            if ci:
                ax.plot(ci, [y, y], "-", color="#1f5fa8", lw=2, zorder=2)
            ax.plot([v], [y], "o", color="#1f5fa8", zorder=3)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{g} (n={gs['n_items']}{', small-n' if gs['n_items'] < SMALL_N else ''})"
                        for g, gs in reversed(groups)], fontsize=8)
    overall = sec["metrics"].get(metric, {})
    ideal = overall.get("ideal")
    if ideal is not None:
        ax.axvline(ideal, color="#0a7a2f", ls="--", lw=1, label=f"ideal {ideal:g}")
    if overall.get("value") is not None:
        ax.axvline(overall["value"], color="#888", ls=":", lw=1, label=f"overall {overall['value']:.3g}")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{bench}: {metric} by {len(groups)} groups (95 % intervals)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def summary_panel(res: dict, policy_results: list[dict]) -> str:
    cards = []
    for b, sec in res["benchmarks"].items():
        name = _headline_names(b, sec)[0]
        m = sec["metrics"][name]
        rules = [r for r in policy_results if r["key"].split(".", 1)[0] == b and r["status"] != "SKIP"]
        verdict = "".join(f"<div class='{r['status']}'>{esc(r['status'])}: {esc(r['rule'])}</div>" for r in rules) \
            or "<div class='note'>no policy rule for this benchmark</div>"
        cards.append(f"<div class='card'><b>{esc(b)}</b> <span class='note'>{esc(sec['protocol'])}, "
                     f"{sec['n_items']} items</span><div>{esc(name)} = <b>{fmt(m.get('value'))}</b> "
                     f"{fmt_ci(m.get('ci95'))}" + (f" <span class='note'>(ideal {m['ideal']:g})</span>"
                                                   if m.get("ideal") is not None else "") + f"</div>{verdict}</div>")
    return f"<div class='panel'>{''.join(cards)}</div>"


def metrics_table(section: dict) -> str:
    rows = []
    for name, m in section["metrics"].items():
        rows.append([name, fmt(m.get("value")), fmt_ci(m.get("ci95")),
                     fmt(m.get("std")) if m.get("std") is not None else "", m.get("scale", "")])
    return table(["metric", "value", "95% CI", "± std over instructions", "scale"], rows)


def groups_table(section: dict) -> str:
    names = list(section["metrics"])
    rows = []
    for g, gs in section.get("groups", {}).items():
        small = gs["n_items"] < SMALL_N
        rows.append([esc(g) + (" <span class='smalln'>(small-n)</span>" if small else ""), gs["n_items"]] +
                    [esc(f"{fmt(gs['metrics'][n].get('value'))} {fmt_ci(gs['metrics'][n].get('ci95'))}") for n in names])
    return table(["group", "n"] + names, rows, raw=True)


def audit_report(result, path, *, policy: str = "default") -> Path:
    from ..signoff.policy import check, load_policy, overall

    res = result.results
    pol = check(res, load_policy(policy))
    sections = [(f"Summary — policy {policy}: {overall(pol)}",
                 summary_panel(res, pol) + "<p class='note'>PASS: the whole 95 % interval meets the rule; FAIL: none "
                 "of it does; INCONCLUSIVE: the interval straddles the threshold. `biaslab check RUN --policy FILE` "
                 "applies another policy.</p>")]
    for b, sec in res["benchmarks"].items():
        desc = "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in sec.get("metric_descriptions", {}).items())
        plots = ""
        if len(sec.get("groups", {})) > 1:
            plots = "".join(figure(forest_plot(b, sec, n), alt=f"{b} {n} by group") for n in _headline_names(b, sec))
            small = [g for g, gs in sec["groups"].items() if gs["n_items"] < SMALL_N]
            if small:
                plots += (f"<p class='note'>small-n (fewer than {SMALL_N} items; drawn hollow, no interval): "
                          f"{esc(', '.join(small))}</p>")
        sections.append((f"{b} — protocol {sec['protocol']} ({sec['n_items']} items)",
                         "".join(f"<p class='note'><b>Note:</b> {esc(n)}</p>" for n in sec.get("notes", []))
                         + metrics_table(sec) + plots + (groups_table(sec) if len(sec.get("groups", {})) > 1 else "")
                         + f"<ul class='note'>{desc}</ul>"))
    sub = f"model {res['model']['spec']} ({res['model']['fingerprint'][:19]}…)" + (" with patch" if res.get("patch") else "")
    manifest = None
    mf = Path(path).parent / "manifest.json"
    if mf.is_file():
        import json

        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except ValueError:
            manifest = None
    return write_page(path, "biaslab audit", sections, subtitle=sub, footer=run_footer(manifest))
