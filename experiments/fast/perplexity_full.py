"""Perplexity of the committed FAST patches on the *whole* WikiText-2 test set (all 1,919 windows), with CIs.

Why (post hoc, planned after the result it follows up): the held-out runs (`run.py --variant js128`) measure
perplexity with the retention benchmark on 20 sampled windows (`--retention-limit 40` = 20 windows + 20 known
facts) and without a CI; race came out at +5.59 %, just over the issue's 5 % budget. Twenty windows are a small
sample of a metric whose per-window change varies a lot, so this script re-measures the *same, unchanged*
patches (`runs/race_js128/patch.safetensors`, `runs/gender_js128/patch.safetensors`; nothing is re-fitted) on
every window of the benchmark's test text, the usual whole-test-set protocol, and gives the paired-bootstrap
95 % interval of the relative change (windows resampled, 1000 resamples, seed 0).

Fixed before running: the reported number is the all-window relative change and its interval; the 20-window
figure stays the pre-specified result in `results_js128.md`, and this one is reported beside it, whichever way it
falls. The FT-L and no-retention baselines are not included: their runs keep no weights (only records).

Usage: python experiments/fast/perplexity_full.py [--limit N] [--out experiments/fast/perplexity_full.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PATCHES = {"stereoset:race": HERE / "runs/race_js128/patch.safetensors",
           "stereoset:gender": HERE / "runs/gender_js128/patch.safetensors"}
BUDGET = 0.05


def relative_change(nll_b: np.ndarray, nll_a: np.ndarray, tokens: np.ndarray, n_boot: int = 1000, seed: int = 0):
    """ppl_after / ppl_before − 1 over all windows (token-weighted, as the benchmark), with a paired bootstrap."""
    def rel(idx):
        t = tokens[idx].sum()
        return math.exp((nll_a[idx].sum() - nll_b[idx].sum()) / t) - 1.0

    all_idx = np.arange(len(tokens))
    rng = np.random.default_rng(seed)
    boots = np.array([rel(rng.integers(0, len(tokens), len(tokens))) for _ in range(n_boot)])
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return rel(all_idx), [float(lo), float(hi)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="first N windows only (a smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "perplexity_full.json")
    args = ap.parse_args()

    from biaslab.benchmarks import get_benchmark
    from biaslab.metrics.retention import perplexity
    from biaslab.models import load_model
    from biaslab.patches import load_patch

    lm = load_model("smollm2-135m-instruct")
    bench = get_benchmark("retention")
    items = bench.load_items()
    wiki = [it for it in items if it["part"] == "wikitext"][:args.limit]
    # the 20 windows the held-out runs scored (retention limit 40, seed 0), to tie this to results_js128.md
    run_ids = {it["id"] for it in bench.sample(items, 40, 0) if it["part"] == "wikitext"}

    def score(desc):
        t = time.perf_counter()
        recs = bench.score(lm, wiki, protocol=bench.protocol())
        print(f"{desc}: {len(recs)} windows in {time.perf_counter() - t:.0f} s", flush=True)
        return recs

    before = score("unpatched")
    tokens = np.array([r["n_tokens"] for r in before], dtype=float)
    nll_b = np.array([r["nll"] for r in before])
    out = {"windows": len(wiki), "tokens": int(tokens.sum()), "budget": BUDGET,
           "perplexity_before": perplexity(before),
           "perplexity_before_run_windows": perplexity([r for r in before if r["id"] in run_ids]),
           "n_run_windows_scored": sum(r["id"] in run_ids for r in before), "patches": {}}
    for task, path in PATCHES.items():
        patch = load_patch(path)
        with patch.applied(lm):
            after = score(task)
        nll_a = np.array([r["nll"] for r in after])
        rel, ci = relative_change(nll_b, nll_a, tokens)
        sub = [i for i, r in enumerate(before) if r["id"] in run_ids]
        out["patches"][task] = {
            "patch": str(path.relative_to(HERE)), "perplexity_after": perplexity(after),
            "relative_change": rel, "relative_change_ci95": ci,
            "within_budget": rel <= BUDGET, "ci_excludes_budget": ci[0] > BUDGET or ci[1] < BUDGET,
            "relative_change_run_windows": (math.exp((nll_a[sub].sum() - nll_b[sub].sum()) / tokens[sub].sum()) - 1)
            if sub else None,
            "share_of_windows_worse": float((nll_a / tokens > nll_b / tokens).mean())}
        print(json.dumps({task: out["patches"][task]}, indent=1), flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
