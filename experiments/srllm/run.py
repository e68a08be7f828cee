"""SR_LLM experiment on the default model (issue 6): train the LoRA rewriter at the default settings, evaluate tuned
vs untuned on held-out test pairs, audit retention before/after. Outputs go to experiments/srllm/out/.

    nice -n 10 .venv/bin/python experiments/srllm/run.py            # ~defaults of `biaslab mitigate srllm`

Single CPU thread (the machine is shared); the same seeds give the same numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _args():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="replace experiments/srllm/out if made with other arguments")
    return ap.parse_args()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("SRLLM_THREADS", "1")))
    from rich.console import Console

    from biaslab.evaluation import run_mitigation

    out = HERE / "out"
    s = run_mitigation("srllm", "smollm2-135m-instruct", "debias_rewrites", None, out=out, limit=100,
                       force=_args().force, console=Console(stderr=True))
    metrics = {f"rewrite.{k}": v for k, v in s["metrics"].items()}
    for b, sec in (s["retention"] or {}).get("benchmarks", {}).items():
        metrics.update({f"{b}.{k}": v for k, v in sec["metrics"].items()})
    print(json.dumps({k: {x: m.get(x) for x in ("before", "after", "delta", "delta_ci95")} for k, m in metrics.items()},
                     indent=1))
    print(json.dumps({"data": s["details"]["data"], "fit_seconds": s["timings_s"].get("fit"),
                      "timings_s": s["timings_s"]}, indent=1))


if __name__ == "__main__":
    main()
