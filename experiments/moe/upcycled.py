"""The mixture-of-experts neuron sites checked with a real model's weights: the default model (SmolLM2-135M-Instruct)
turned into an 8-expert Mixtral by sparse upcycling (every expert a copy of its layer's FFN, a seeded random
router, top-2; ``tests/families.upcycle``).

The router's top-2 weights sum to 1, so the MoE model computes the dense model's function, whatever the router
chose. It therefore checks, on real weights and real benchmark prompts:

1. **scoring**: the audit of the MoE model (tree-attention scoring through the fused experts) gives the dense
   model's predictions and metric values, intervals included (BBQ letter protocol and CrowS-Pairs);
2. **attribution**: at every position, a dense neuron's activation × gradient is the sum of its 8 copies'
   (each copy's activation is the dense one, its gradient the dense one times its routing weight), over all 30
   layers, on CRISPR's BBQ-Age dev prompts — biaslab's recomputation of the experts differentiated end to end;
3. **CRISPR on the MoE model**: the demo-sized fit on BBQ-Age (4 neurons, letter protocol, 1 instruction) on both
   models. The dense fit prunes a neuron everywhere; on the MoE model a pruned neuron is one expert's copy, so it
   is silenced only for the tokens routed to that expert. Both fits are reported with their intervals, not as a
   claim about real MoE models (whose experts differ).

Run: .venv/bin/python experiments/moe/upcycled.py   (about 7.5 minutes on 2 CPU cores; writes upcycled.json;
README.md beside it reads the numbers)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def audit_pair(lms: dict, limit: int) -> dict:
    from biaslab.auditing import audit

    res = {name: audit(lm, "bbq,crows", limit=limit, seed=0) for name, lm in lms.items()}
    out = {}
    for bench in ("bbq", "crows"):
        d, m = res["dense"], res["moe"]
        rec_d = {(r["id"], r.get("instruction", 0)): r for r in d.records[bench]}
        rec_m = {(r["id"], r.get("instruction", 0)): r for r in m.records[bench]}
        keys = sorted(rec_d)
        same = sum(rec_d[k].get("pred") == rec_m[k].get("pred") for k in keys) / len(keys)
        # BBQ records hold each option's log-prob, CrowS records the two sentences' scores
        num = [(a, b) for k in keys for a, b in zip(rec_d[k].get("logprobs", []), rec_m[k].get("logprobs", []))]
        num += [(rec_d[k][f], rec_m[k][f]) for k in keys for f in ("score_more", "score_less") if f in rec_d[k]]
        moe_metrics = m.results["benchmarks"][bench]["metrics"]
        metrics = {name: {"dense": sec["value"], "moe": moe_metrics[name]["value"], "dense_ci95": sec.get("ci95"),
                          "moe_ci95": moe_metrics[name].get("ci95")}
                   for name, sec in d.results["benchmarks"][bench]["metrics"].items()}
        out[bench] = {"records": len(keys), "same_prediction_share": same,
                      "max_abs_diff_record_numbers": max((abs(a - b) for a, b in num), default=None),
                      "numbers_compared": len(num), "metrics": metrics}
    return out


def attribution_split(lms: dict, n_prompts: int) -> dict:
    from biaslab import attribution as A
    from biaslab.methods.crispr.selection import split_dev_test
    from biaslab.task_specs import load_task
    from biaslab.tasks import prompt_text

    _, items = load_task("bbq:Age")
    dev, _ = split_dev_test(items, dev_fraction=0.1, seed=0)
    lm_d, lm_m = lms["dense"], lms["moe"]
    seqs = [lm_d.encode(prompt_text(lm_d, it, 0, protocol="letter")) for it in dev[:n_prompts]]
    tg = [lm_d.candidate_token_id("A")] * len(seqs)
    t = time.perf_counter()
    a_d = A.activation_x_gradient(lm_d, seqs, tg, reduce="sum")
    t_d = time.perf_counter() - t
    t = time.perf_counter()
    a_m = A.activation_x_gradient(lm_m, seqs, tg, reduce="sum")
    t_m = time.perf_counter() - t
    width = lm_d.model.config.intermediate_size
    worst_abs, worst_rel, scale = 0.0, 0.0, 0.0
    for i in range(lm_d.model.config.num_hidden_layers):
        d = a_d[f"model.layers.{i}.mlp.down_proj"]
        m = a_m[f"model.layers.{i}.mlp.experts"].view(len(seqs), -1, width).sum(dim=1)
        worst_abs = max(worst_abs, float((m - d).abs().max()))
        scale = max(scale, float(d.abs().max()))
    worst_rel = worst_abs / scale
    top_d = A.rank_neurons(a_d, 10)
    summed = {k.replace(".mlp.experts", ".mlp.down_proj"): v.view(len(seqs), -1, width).sum(dim=1)
              for k, v in a_m.items()}
    top_m = A.rank_neurons(summed, 10)
    return {"prompts": len(seqs), "layers": lm_d.model.config.num_hidden_layers,
            "max_abs_diff_sum_of_copies_vs_dense": worst_abs, "largest_dense_score": scale,
            "max_diff_relative_to_largest_score": worst_rel,
            "same_top10_neurons_from_summed_copies": [(n, u) for n, u, _ in top_d] == [(n, u) for n, u, _ in top_m],
            "seconds": {"dense": round(t_d, 1), "moe": round(t_m, 1)}}


def crispr_pair(lms: dict, limit: int, tmp: Path) -> dict:
    from biaslab.evaluation import run_mitigation
    from biaslab.patches import load_patch

    cfg = {"neurons": 4, "instructions": 1, "protocol": "letter", "dev_size": 20, "control_seeds": 1,
           "retention": False}
    out = {}
    for name, lm in lms.items():
        t = time.perf_counter()
        s = run_mitigation("crispr", lm, "bbq:Age", cfg, out=tmp / name, limit=limit, n_boot=1000)
        m = s["metrics"]["accuracy"]
        units = load_patch(tmp / name / "patch.safetensors").units
        width = lm.model.config.intermediate_size
        pruned = sorted((int(site.split(".")[2]), *((int(u) // width, int(u) % width) if "experts" in site
                                                     else (None, int(u))))
                        for site, us in units.items() for u in us)
        out[name] = {"accuracy": {k: m[k] for k in ("before", "before_ci95", "after", "after_ci95", "delta",
                                                    "delta_ci95", "verdict") if k in m},
                     "neurons_per_layer": s["details"]["neurons_per_layer"],
                     "neurons_per_expert": s["details"].get("neurons_per_expert"),
                     "pruned_layer_expert_neuron": pruned,
                     "seconds": round(time.perf_counter() - t, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=200, help="audit items per benchmark")
    ap.add_argument("--prompts", type=int, default=16, help="BBQ-Age dev prompts for the attribution check")
    ap.add_argument("--crispr-limit", type=int, default=100, help="BBQ-Age test items of the CRISPR runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("upcycled.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from families import upcycle

    from biaslab.models import LanguageModel, load_model

    torch.manual_seed(0)
    dense = load_model("smollm2-135m-instruct", dtype="float32", progress=False)
    moe_model = upcycle(dense.model, n_experts=8, top_k=2, seed=0)
    moe = LanguageModel(moe_model, dense.tokenizer, spec="smollm2-135m-instruct, upcycled to 8 experts (top-2)",
                        progress=False)
    lms = {"dense": dense, "moe": moe}
    impl = moe_model.config._experts_implementation
    out = {"model": "smollm2-135m-instruct",
           "moe": {"experts": 8, "top_k": 2, "router_seed": 0, "experts_implementation": impl},
           "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    out["audit"] = audit_pair(lms, a.limit)
    out["attribution"] = attribution_split(lms, a.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        out["crispr"] = crispr_pair(lms, a.crispr_limit, Path(tmp))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
