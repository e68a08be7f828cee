"""Self-contained HTML reports (plots embedded as PNG data URIs). Building blocks shared by every method:
``page``, ``table``, ``figure``; plus ``audit_report`` for an audit run."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..runs import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}
.good{color:#0a7a2f}.bad{color:#b00020}h2{border-bottom:1px solid #ddd;padding-bottom:4px}code{background:#f6f6f6}"""


def esc(x) -> str:
    return html.escape(str(x))


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ci(ci, digits: int = 3) -> str:
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else "–"


def table(headers: list[str], rows: list[list], *, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    cell = (lambda c: str(c)) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(fig, *, alt: str = "plot") -> str:
    """Embed a matplotlib figure as a PNG data URI (and close it)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def page(title: str, sections: list[tuple[str, str]], *, subtitle: str = "") -> str:
    body = "".join(f"<h2>{esc(h)}</h2>{content}" for h, content in sections)
    sub = f'<p class="note">{esc(subtitle)}</p>' if subtitle else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{esc(title)}</h1>{sub}{body}</body></html>")


def write_page(path, title: str, sections: list[tuple[str, str]], **kw) -> Path:
    atomic_write_text(Path(path), page(title, sections, **kw))
    return Path(path)


def metrics_table(section: dict) -> str:
    rows = []
    for name, m in section["metrics"].items():
        rows.append([name, fmt(m.get("value")), fmt_ci(m.get("ci95")), fmt(m.get("std")) if m.get("std") is not None else "",
                     m.get("scale", "")])
    return table(["metric", "value", "95% CI", "± std over instructions", "scale"], rows)


def groups_table(section: dict) -> str:
    names = list(section["metrics"])
    rows = []
    for g, gs in section.get("groups", {}).items():
        rows.append([g, gs["n_items"]] + [f"{fmt(gs['metrics'][n].get('value'))} {fmt_ci(gs['metrics'][n].get('ci95'))}" for n in names])
    return table(["group", "n"] + names, rows)


def audit_report(result, path) -> Path:
    res = result.results
    sections = []
    for b, sec in res["benchmarks"].items():
        desc = "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in sec.get("metric_descriptions", {}).items())
        sections.append((f"{b} — protocol {sec['protocol']} ({sec['n_items']} items)",
                         metrics_table(sec) + (groups_table(sec) if len(sec.get("groups", {})) > 1 else "") +
                         f"<ul class='note'>{desc}</ul>"))
    sub = f"model {res['model']['spec']} ({res['model']['fingerprint'][:19]}…)" + (" with patch" if res.get("patch") else "")
    return write_page(path, "biaslab audit", sections, subtitle=sub)
