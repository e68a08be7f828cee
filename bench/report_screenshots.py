"""Check biaslab's HTML reports in a real headless browser and screenshot them (issue 18, "reports").

    python bench/report_screenshots.py REPORT.html [REPORT.html ...] --out docs/img [--browser /usr/bin/chromium]

For every report and every width (1,024 and 1,400 px): open it with no network, fail if the page is wider than the
viewport (horizontal overflow of the document; tables scroll inside their own box, which is allowed) or if an
image did not decode; save a full-page PNG as OUT/<name>-<width>.png. Needs the ``screenshots`` extra
(``pip install -e '.[screenshots]'``) and a Chromium (Debian: ``apt-get install chromium``); not part of
``make test`` because CI machines have no browser. Exit 0 when every page passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WIDTHS = (1024, 1400)
CHECK = """() => {
  const doc = document.documentElement;
  const imgs = Array.from(document.images);
  return {
    scrollWidth: doc.scrollWidth, innerWidth: window.innerWidth,
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    wideImages: imgs.filter(i => i.getBoundingClientRect().right > window.innerWidth + 1).map(i => i.alt),
    viewportMeta: !!document.querySelector('meta[name=viewport]'),
    footer: !!document.querySelector('footer'),
  };
}"""


def check_page(page, path: Path, width: int, out: Path, name: str) -> dict:
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    info = page.evaluate(CHECK)
    problems = []
    if info["scrollWidth"] > info["innerWidth"]:
        problems.append(f"page overflows: {info['scrollWidth']} px wide in a {info['innerWidth']} px viewport")
    if info["broken"]:
        problems.append(f"broken images: {info['broken']}")
    if info["wideImages"]:
        problems.append(f"images wider than the viewport: {info['wideImages']}")
    if not info["viewportMeta"]:
        problems.append("no viewport meta tag")
    shot = out / f"{name}-{width}.png"
    page.screenshot(path=str(shot), full_page=True)
    return {"report": str(path), "width": width, "screenshot": str(shot), "problems": problems, **info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--names", default="", help="comma-separated screenshot names (default: the parent folder)")
    ap.add_argument("--browser", default="/usr/bin/chromium")
    a = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("error: needs playwright: pip install -e '.[screenshots]'", file=sys.stderr)
        return 2
    if not Path(a.browser).is_file():
        print(f"error: no browser at {a.browser} (Debian: apt-get install chromium; or pass --browser)", file=sys.stderr)
        return 2
    names = [n for n in a.names.split(",") if n] or [p.parent.name for p in a.reports]
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.browser, args=["--no-sandbox"])
        ctx = browser.new_context(offline=True)
        page = ctx.new_page()
        for rep, name in zip(a.reports, names):
            for w in WIDTHS:
                r = check_page(page, rep, w, a.out, name)
                results.append(r)
                status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
                print(f"{name} @ {w}px: {r['images']} images, {r['scrollWidth']} px wide — {status} → {r['screenshot']}")
        browser.close()
    (a.out / "screenshots.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
