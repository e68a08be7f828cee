"""Instruction robustness of a finished CRISPR run: score the same held-out test items under further instructions before / after the run's patch (nothing is re-fitted; the patch and the test items
are the run's), then report accuracy per instruction, std over instructions before / after, and the paired
bootstrap over items of the mean-over-instructions delta. Writes experiments/crispr/instructions_<run>.json.

Run: ``nice -n 10 .venv/bin/python experiments/crispr/second_instruction.py --run runs/crispr-v2-bbq-age --add 1``"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/crispr-v2-bbq-age")
    ap.add_argument("--add", type=int, nargs="+", default=[1], help="instruction indices to add (0-9)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from biaslab import stats
    from biaslab.methods import crispr as C
    from biaslab.evaluation.compare import score_mc_resumable
    from biaslab.runs import atomic_write_json, clean_nan
    from finished_run import open_run

    fr = open_run(args.run)
    run, lm, patch, task, cfg, test_items = fr.path, fr.lm, fr.patch, fr.task, fr.cfg, fr.test_items
    before, after = fr.records("before"), fr.records("after")
    have = sorted({r["instruction"] for r in before})
    add = [i for i in args.add if i not in have]
    before += score_mc_resumable(lm, test_items, add, protocol=cfg.protocol, desc="before (added instructions)")
    after += score_mc_resumable(lm, test_items, add, protocol=cfg.protocol, patch=patch, desc="after (added instructions)")
    metrics = C.task_metrics(task)
    mv_b, mv_a = C.metric_values(before, metrics), C.metric_values(after, metrics)
    res = {"run": str(run), "task": task, "n_test_items": len(test_items), "instructions": have + add,
           "n_neurons": patch.n_neurons, "metrics": {}}
    for m in metrics:
        b = stats.paired_bootstrap(before, after, C.per_instruction(m.fn), n_boot=1000, seed=0)
        res["metrics"][m.name] = {"before": b["before"], "after": b["after"], "delta": b["delta"],
                                  "delta_ci95": b["delta_ci95"], "p": b["p"],
                                  "per_instruction_before": mv_b[m.name]["per_instruction"],
                                  "per_instruction_after": mv_a[m.name]["per_instruction"],
                                  "std_before": mv_b[m.name]["std_over_instructions"],
                                  "std_after": mv_a[m.name]["std_over_instructions"]}
    out = Path(__file__).resolve().parent / f"instructions_{run.name}.json"
    atomic_write_json(out, clean_nan(res))
    print(json.dumps(clean_nan(res)["metrics"]["accuracy"], indent=1))


if __name__ == "__main__":
    main()
