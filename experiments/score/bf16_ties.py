"""How often BBQ letter-protocol items tie exactly between their two best options, in float32 and bfloat16 on the
default model, with the LM head's logits rounded to bf16 (as transformers computes them in a bf16 model) and formed
in float32 (biaslab's head_logits). Ties go to the first option, so a tie rate is a hidden position bias.

Run: .venv/bin/python experiments/score/bf16_ties.py --items 300 (about 3 minutes on 2 CPU cores)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import biaslab.models.lm as L
from biaslab.benchmarks import get_benchmark
from biaslab.benchmarks.base import tied_at_top
from biaslab.models import load_model
from biaslab.stats import bootstrap_ci


def rounded_head(head, picked, after=None):   # what the head gave before: logits in the model's dtype, upcast
    z = L._upcast(head(picked))
    return z if after is None else after(z)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("bf16_ties.json"))
    a = ap.parse_args()
    b = get_benchmark("bbq", instructions=1)
    items = b.sample(b.load_items(), a.items, 0)
    proto = b.protocol()
    runs = {}
    for name, dtype, head in (("float32", "float32", None), ("bfloat16, logits rounded to bf16", "bfloat16", rounded_head),
                              ("bfloat16, logits formed in float32", "bfloat16", None)):
        saved = L.head_logits
        if head is not None:
            L.head_logits = head
        try:
            lm = load_model(dtype=dtype, progress=False)
            lm.progress = False
            t = time.perf_counter()
            recs = b.score(lm, items, protocol=proto)
            runs[name] = {"records": recs, "s": round(time.perf_counter() - t, 1)}
        finally:
            L.head_logits = saved
    ref = runs["float32"]["records"]
    out = {"items": len(items), "protocol": proto.id, "model": "smollm2-135m-instruct", "runs": {}}
    for name, r in runs.items():
        recs = r["records"]
        rows = [{"id": x["id"], "tie": float(tied_at_top(x["logprobs"])),
                 "same": float(x["pred"] == y["pred"]), "first": float(x["pred"] == 0)} for x, y in zip(recs, ref)]
        res = {"s": r["s"]}
        for key, label in (("tie", "tie_rate"), ("same", "same_prediction_as_float32"), ("first", "first_option_share")):
            ci = bootstrap_ci(rows, lambda rs, k=key: sum(x[k] for x in rs) / len(rs), seed=0)   # clusters: item ids
            res[label], res[label + "_ci95"] = round(ci["value"], 4), [round(c, 4) for c in ci["ci95"]]
        out["runs"][name] = res
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
