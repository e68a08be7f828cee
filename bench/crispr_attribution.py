"""CRISPR attribution cost and agreement on the default model (issue 3, "Performance").

Measures, on the same SST-2 dev items under one instruction:
1. activation × gradient (one forward + one backward per (instance, instruction)) — seconds per instance;
2. CRISPR's full bias score (one forward + two backwards: biased option and gold) — seconds per instance and the
   peak RSS of the process at the default token budget (1024 tokens per batch);
3. integrated gradients, 20 steps, joint (all layers gated at once: 20 forward+backward passes);
4. integrated gradients, 20 steps, layer by layer (knowledge-neurons style: 20 × n_layers passes) — timed on
   ``--ig-layers`` evenly spaced layers and extrapolated to all layers (the full run would take ~n_layers/k
   times longer); agreement is computed on the layers run.
Agreement with activation × gradient: top-100 overlap and Spearman correlation over neurons.

Run: ``nice -n 10 .venv/bin/python bench/crispr_attribution.py --items 2 --out bench/results/crispr_attribution.json``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def top_overlap(a: dict, b: dict, k: int = 100) -> float:
    from biaslab.attribution import rank_neurons

    ta = {(n, u) for n, u, _ in rank_neurons(a, k)}
    tb = {(n, u) for n, u, _ in rank_neurons(b, k)}
    return len(ta & tb) / k


def flat(d: dict, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=2)
    ap.add_argument("--rss-items", type=int, default=16, help="items for the CRISPR-score timing / peak RSS run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ig-layers", type=int, default=3, help="layers run for layer-by-layer IG (evenly spaced)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/crispr_attribution.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")

    from biaslab import attribution as A
    from biaslab.methods import crispr as C
    from biaslab.models import load_model
    from biaslab.tasks import answer_targets, prompt_text, load_sst2

    lm = load_model(args.model)
    lm.progress = False
    dev = load_sst2("dev")
    items = C.sample_items(dev, args.items, 0)
    seqs = [lm.encode(prompt_text(lm, it, 0)) for it in items]
    cands = [[lm.candidate_token_id(t) for t in answer_targets(lm, it)] for it in items]
    # target: the most probable wrong option (CRISPR's ŷ)
    with torch.no_grad():
        lp = A.objective_values  # noqa: F841 (kept for clarity)
    tg = []
    for it, s, c in zip(items, seqs, cands):
        v = [float(A.objective_values(lm, [s], [t])[0]) for t in c]
        tg.append(c[max((k for k in range(len(c)) if k != it.gold), key=lambda k: v[k])])
    sites = A.resolve_sites(lm, "ffn")
    names = [s.name for s in sites]
    res = {"model": lm.spec, "threads": args.threads, "n_items": len(items), "n_tokens": [len(s) for s in seqs],
           "steps": args.steps, "n_layers": len(sites), "n_neurons": sum(s.n_units for s in sites),
           "load_avg_start": os.getloadavg()}

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    # warm-up (allocator, first-call overheads)
    A.activation_x_gradient(lm, seqs[:1], tg[:1])
    axg, t_axg = timed(lambda: A.activation_x_gradient(lm, seqs, tg))
    res["axg_s_per_instance"] = t_axg / len(items)

    big = C.sample_items(dev, args.rss_items, 1)
    cfg = C.CrisprConfig(neurons=1, instructions=1)
    _, t_crispr = timed(lambda: C.bias_scores(lm, big, [0], cfg))
    res["crispr_score_s_per_instance"] = t_crispr / len(big)
    res["crispr_score_items"] = len(big)
    res["token_budget"] = cfg.token_budget
    res["peak_rss_mb_after_crispr_scores"] = rss_peak_mb()

    ig_joint, t_joint = timed(lambda: A.integrated_gradients(lm, seqs, tg, steps=args.steps, mode="joint"))
    res["ig_joint_s_per_instance"] = t_joint / len(items)
    res["ig_joint_ratio_vs_axg"] = t_joint / t_axg
    res["ig_joint_top100_overlap"] = top_overlap(axg, ig_joint)
    res["ig_joint_spearman"] = A.spearman(flat(axg, names), flat(ig_joint, names))

    k = max(1, min(args.ig_layers, len(sites)))
    pick = sorted({round(j * (len(sites) - 1) / max(1, k - 1)) for j in range(k)}) if k > 1 else [len(sites) - 1]
    sub = [sites[j] for j in pick]
    ig_layer, t_layer = timed(lambda: A.integrated_gradients(lm, seqs, tg, sites=sub, steps=args.steps, mode="layer"))
    per_layer = t_layer / len(sub)
    res["ig_layer_layers_run"] = pick
    res["ig_layer_s_per_instance_extrapolated"] = per_layer * len(sites) / len(items)
    res["ig_layer_ratio_vs_axg_extrapolated"] = per_layer * len(sites) / t_axg
    sub_names = [s.name for s in sub]
    axg_sub = {n: axg[n] for n in sub_names}
    res["ig_layer_top100_overlap_on_layers_run"] = top_overlap(axg_sub, ig_layer)
    res["ig_layer_spearman_on_layers_run"] = A.spearman(flat(axg_sub, sub_names), flat(ig_layer, sub_names))
    res["ig_joint_vs_layer_spearman_on_layers_run"] = A.spearman(flat({n: ig_joint[n] for n in sub_names}, sub_names),
                                                                 flat(ig_layer, sub_names))
    res["peak_rss_mb"] = rss_peak_mb()
    res["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
