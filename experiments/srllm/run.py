"""SR_LLM experiment on the default model (issue 6): train the LoRA rewriter at the default settings, evaluate tuned
vs untuned on held-out test pairs, audit retention before/after. Outputs go to experiments/srllm/out/.

    nice -n 10 .venv/bin/python experiments/srllm/run.py            # ~defaults of `biaslab mitigate srllm`

Single CPU thread (the machine is shared); the same seeds give the same numbers.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.set_num_threads(int(os.environ.get("SRLLM_THREADS", "1")))
    from biaslab.mitigations.srllm import SRLLMConfig, mitigate

    out = HERE / "out"
    s = mitigate("smollm2-135m-instruct", out, cfg=SRLLMConfig(), force="--force" in sys.argv,
                 log=lambda m: print(f"[srllm] {m}", file=sys.stderr, flush=True))
    keys = ["rewrite.chrf", "rewrite.bleu", "rewrite.removal_rate", "rewrite.exact_match", "rewrite.copy_rate",
            "rewrite.content_preservation", "stereoset.lms", "stereoset.ss", "stereoset.icat",
            "crows.stereotype_score", "retention.perplexity", "retention.knowledge_accuracy"]
    print(json.dumps({k: {x: s["metrics"][k].get(x) for x in ("before", "after", "delta", "delta_ci95")}
                      for k in keys if k in s["metrics"]}, indent=1))
    print(json.dumps({"data": s["data"], "train_seconds": s["training"].get("train_seconds"),
                      "timings_s": s["timings_s"]}, indent=1))


if __name__ == "__main__":
    main()
