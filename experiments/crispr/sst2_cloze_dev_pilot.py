"""SST-2 under the ``cloze`` protocol, DEV items only: before committing to a test run, see on the task's dev split
whether pruning CRISPR's top neurons changes anything, and how dev accuracy behaves in n (to set the search range).
Attribution: 20 dev instances × 3 instructions (the run's defaults); grid n ∈ {0, 1, 2, 4, 8, 16, 32, 64, 128} on
the whole dev split (182 items) × 3 instructions. No test item is touched (the split is the run's: 10 % dev, seed 0).

Writes experiments/crispr/sst2_cloze/dev_pilot.json.
Run: ``nice -n 10 .venv/bin/python experiments/crispr/sst2_cloze_dev_pilot.py``"""
from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path


def main() -> None:
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from biaslab.methods import crispr as C
    from biaslab.attribution import rank_neurons
    from biaslab.models import load_model
    from biaslab.patches import NeuronMaskPatch
    from biaslab.runs import atomic_write_json
    from biaslab.task_specs import load_task
    from biaslab.tasks import score_mc

    cfg = C.CrisprConfig(protocol="cloze", instructions=3, neurons=0).validate()
    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    _, items = load_task("sst2")
    dev, _ = C.split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    t = time.perf_counter()
    scores, info = C.trial_scores(lm, dev, cfg)
    t_attr = time.perf_counter() - t
    instr = list(range(cfg.instructions))
    out = {"n_dev": len(dev), "instructions": instr, "attribution": info, "attribution_s": round(t_attr, 1),
           "gold_positive_share": sum(it.gold for it in dev) / len(dev),
           "top_neurons": [(n, u, round(v, 5)) for n, u, v in rank_neurons(scores, 16)], "grid": {}}
    print(json.dumps({k: out[k] for k in ("n_dev", "attribution_s", "gold_positive_share")}), flush=True)
    for n in (0, 1, 2, 4, 8, 16, 32, 64, 128):
        p = NeuronMaskPatch.from_units(lm, C.top_units(scores, n), sites=cfg.sites)
        t = time.perf_counter()
        with p.applied(lm):
            recs = score_mc(lm, dev, instr, protocol=cfg.protocol)
        per_instr = [C.accuracy_mean([r for r in recs if r["instruction"] == i]) for i in instr]
        row = {"accuracy": round(C.accuracy_mean(recs), 4), "gold_prob": round(C.gold_prob_mean(recs), 4),
               "accuracy_per_instruction": [round(a, 4) for a in per_instr],
               "positive_rate": round(sum(r["pred"] for r in recs) / len(recs), 4),
               "answers": dict(collections.Counter(("negative", "positive")[r["pred"]] for r in recs)),
               "seconds": round(time.perf_counter() - t, 1)}
        out["grid"][str(n)] = row
        print(n, row, flush=True)
    atomic_write_json(Path(__file__).resolve().parent / "sst2_cloze" / "dev_pilot.json", out)


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
