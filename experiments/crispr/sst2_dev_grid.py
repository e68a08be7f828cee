"""SST-2, DEV items only: the golden-section search (run.sh step 1) never looked below n = 12, because dev accuracy
was flat there; this grid scores n ∈ {1, 2, 3, 4, 6, 8} on the very dev items and instruction the search used,
with the same objective (accuracy+goldprob), to see whether a small n helps on dev. No test item is touched.
Rule fixed before looking: if the best grid value beats the search's best (n = 0), that n is evaluated on test by
`biaslab mitigate crispr --neurons n` (run.sh step 1b); otherwise nothing more is run.

Writes experiments/crispr/sst2/dev_grid.json. Run: ``nice -n 10 .venv/bin/python experiments/crispr/sst2_dev_grid.py``
(``--run DIR --out FILE --grid 1 2 3`` for another run: the SST-2 cloze run with 10 instructions uses it the same way)."""
from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/crispr-v2-sst2")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "sst2" / "dev_grid.json"))
    ap.add_argument("--grid", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from safetensors.torch import load_file

    from biaslab.methods import crispr as C

    from biaslab.attribution import rank_neurons
    from biaslab.models import load_model
    from biaslab.patches import NeuronMaskPatch
    from biaslab.runs import atomic_write_json
    from biaslab.task_specs import load_task
    from biaslab.tasks import score_mc

    run = Path(args.run)
    man = json.loads((run / "manifest.json").read_text())["args"]
    cfg = C.CrisprConfig(**man["config"])
    lm = load_model(man["model"])
    lm.progress = False
    scores = load_file(str(run / "attribution.safetensors"))
    _, items = load_task(man["task"])
    dev, _ = C.split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    its = C.sample_items(dev, cfg.search_dev_limit, cfg.split_seed)  # the search's dev items
    instr = list(range(cfg.instructions))
    search = json.loads((run / "search.json").read_text())["dev_accuracy"]
    out = {"dev_items": len(its), "ids_hash": C.ids_hash(its), "instructions": instr, "objective": cfg.search_objective,
           "search": search, "top_neurons": [(n, u, round(v, 5)) for n, u, v in rank_neurons(scores, 8)],
           "grid": {}}
    for n in args.grid:
        p = NeuronMaskPatch.from_units(lm, C.top_units(scores, n), sites=cfg.sites)
        with p.applied(lm):
            recs = score_mc(lm, its, instr, protocol=cfg.protocol)
        row = {"objective": C.search_objective_value(recs, cfg.search_objective), "accuracy": C.accuracy_mean(recs),
               "gold_prob": C.gold_prob_mean(recs), "answers": dict(collections.Counter(
                   ("negative", "positive")[r["pred"]] if cfg.protocol == "cloze" else "AB"[r["pred"]] for r in recs))}
        out["grid"][str(n)] = row
        print(n, row, flush=True)
    allv = {**{k: v for k, v in search.items()}, **{k: v["objective"] for k, v in out["grid"].items()}}
    best = max(allv, key=lambda k: (allv[k], -int(k)))
    out["best_n_on_dev"] = int(best)
    atomic_write_json(Path(args.out), out)
    print("best n on dev:", best)


if __name__ == "__main__":
    main()
