"""Self-contained HTML reports (plots embedded as PNG data URIs). Building blocks shared by every method:
``page``, ``table``, ``figure``, the footer; the audit run's page is :mod:`biaslab.report.audit`."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..runs import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;height:auto}.scroll{overflow-x:auto}footer{margin-top:3em;border-top:1px solid #ddd;padding-top:.5em}
.panel{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;min-width:200px}
.card b{font-size:15px}.PASS{color:#0a7a2f}.FAIL{color:#b00020}.INCONCLUSIVE{color:#a06000}.smalln{color:#999}
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
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def figure(fig, *, alt: str = "plot") -> str:
    """Embed a matplotlib figure as a PNG data URI (and close it)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def footer_html(info: dict | None) -> str:
    """The run's date, versions, seed and command line (what a reader needs to reproduce the page)."""
    if not info:
        return ""
    rows = "".join(f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in info.items() if v not in (None, ""))
    return f"<footer class='note'><ul>{rows}</ul></footer>"


def run_footer(manifest: dict | None, **extra) -> dict:
    """Footer facts from a run's manifest (created, biaslab/torch/transformers versions, git commit, command)."""
    import sys

    m = manifest or {}
    env = m.get("environment", {})
    pk = env.get("packages", {})
    info = {"run created": m.get("created"), "seed": (m.get("args") or {}).get("seed"),
            "biaslab": pk.get("biaslab"), "torch": pk.get("torch"), "transformers": pk.get("transformers"),
            "python": env.get("python"), "git commit": env.get("git_commit"),
            "command": m.get("command") or " ".join(["biaslab"] + sys.argv[1:])}
    info.update(extra)
    return info


def page(title: str, sections: list[tuple[str, str]], *, subtitle: str = "", footer: dict | None = None) -> str:
    body = "".join(f"<h2>{esc(h)}</h2>{content}" for h, content in sections)
    sub = f'<p class="note">{esc(subtitle)}</p>' if subtitle else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>{sub}{body}{footer_html(footer)}</body></html>")


def write_page(path, title: str, sections: list[tuple[str, str]], **kw) -> Path:
    atomic_write_text(Path(path), page(title, sections, **kw))
    return Path(path)

