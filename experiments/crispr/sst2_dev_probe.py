"""SST-2 diagnostic on DEV items only (no test item is touched): what pruning the top-n CRISPR neurons does to the
label prior. Uses the attribution scores cached by the main run (runs/crispr-sst2/attribution.safetensors).

Two probes, exactly as run for the report (instruction 0):
- 24 dev items (stratified, seed 7), n ∈ {0, 1, 2, 3}: accuracy, predictions, AUC of logP(B) − logP(A);
- 10 dev items (seed 5), n ∈ {0, 5, 50, 300}: accuracy, predictions, mean P(A), P(B).
Writes experiments/crispr/sst2/dev_probe.json.

Run: ``nice -n 10 .venv/bin/python experiments/crispr/sst2_dev_probe.py``"""
from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    from biaslab.mitigations import crispr as C
    from biaslab.models import load_model
    from biaslab.patches import NeuronMaskPatch
    from biaslab.runs import atomic_write_json
    from biaslab.tasks import load_task, score_mc

    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    scores = load_file("runs/crispr-sst2/attribution.safetensors")
    _, items = load_task("sst2")
    dev, _ = C.split_dev_test(items)
    out = {"top_neurons": [(n, u, round(v, 5)) for n, u, v in C.attr.rank_neurons(scores, 10)], "probes": []}
    for n_items, seed, ns in ((24, 7, (0, 1, 2, 3)), (10, 5, (0, 5, 50, 300))):
        its = C.sample_items(dev, n_items, seed)
        for n in ns:
            p = NeuronMaskPatch.from_units(lm, C.top_units(scores, n), sites="ffn")
            with p.applied(lm):
                recs = score_mc(lm, its, [0])
            margin = [r["logprobs"][1] - r["logprobs"][0] for r in recs]
            row = {"n_items": n_items, "seed": seed, "n": n, "accuracy": sum(r["correct"] for r in recs) / len(recs),
                   "predictions": dict(collections.Counter(str(r["pred"]) for r in recs)),
                   "auc_margin": roc_auc_score([r["gold"] for r in recs], margin),
                   "mean_p": [sum(math.exp(r["logprobs"][k]) for r in recs) / len(recs) for k in range(2)]}
            out["probes"].append(row)
            print(row, flush=True)
    atomic_write_json(Path(__file__).resolve().parent / "sst2" / "dev_probe.json", out)


if __name__ == "__main__":
    main()
