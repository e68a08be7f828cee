"""Retention of a CRISPR patch: CrowS-Pairs, StereoSet (SS, LMS, ICAT) and retention (perplexity, known facts)
before / after, paired-bootstrap CIs, compared with the unpatched model's own CI width; plus the other task's
accuracy (the BBQ-Age patch on held-out SST-2 test items; the SST-2 patch on held-out BBQ-Age items).
Writes experiments/crispr/retention_<name>.json.

Run: ``nice -n 10 .venv/bin/python experiments/crispr/retention.py --run runs/crispr-v2-bbq-age --limit 40``
or ``… --run runs/crispr-cloze-sst2 --from-summary --other-task bbq:Age --other-limit 200 --threads 2``"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/crispr-v2-bbq-age")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--other-task", default="sst2")
    ap.add_argument("--other-limit", type=int, default=40)
    ap.add_argument("--other-protocol", default="letter")
    ap.add_argument("--from-summary", action="store_true",
                    help="take the benchmarks' before/after from the run's summary.json (its in-run retention) "
                         "instead of re-scoring them; only the other task is scored")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from biaslab import stats
    from biaslab.methods import crispr as C
    from biaslab.evaluation.compare import retention_comparison
    from biaslab.evaluation.compare import score_mc_resumable
    from biaslab.models import load_model
    from biaslab.patches import load_patch
    from biaslab.runs import atomic_write_json, clean_nan
    from biaslab.task_specs import load_task

    run = Path(args.run)
    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    patch = load_patch(run / "patch.safetensors")
    res = {"patch": str(run / "patch.safetensors"), "n_neurons": patch.n_neurons, "limit": args.limit}
    if args.from_summary:
        summary = json.loads((run / "summary.json").read_text())
        res["benchmarks"] = summary["retention"]
        res["limit"] = summary.get("retention_limit") or max(s["n_items"] for s in summary["retention"].values())
    else:
        res["benchmarks"] = retention_comparison(lm, patch, C.DEFAULT_RETENTION, limit=args.limit, seed=0,
                                               out=run / "retention_exp", n_boot=1000)
    # other task: held-out SST-2 test items (split seed 0, stratified sample seed 0), same instructions as the patch
    instr = list(range(patch.params["instructions"]))
    task, items = load_task(args.other_task)
    _, test = C.split_dev_test(items)
    its = C.sample_items(test, args.other_limit, 0)
    before = score_mc_resumable(lm, its, instr, protocol=args.other_protocol, desc="other before")
    after = score_mc_resumable(lm, its, instr, protocol=args.other_protocol, patch=patch, desc="other after")
    res["other_task"] = {"task": task, "n_items": len(its), "instructions": instr, "protocol": args.other_protocol,
                         "metrics": {}}
    for m in C.task_metrics(task):
        b = stats.paired_bootstrap(before, after, C.per_instruction(m.fn), n_boot=1000, seed=0)
        res["other_task"]["metrics"][m.name] = {k: b[k] for k in ("before", "after", "delta", "delta_ci95", "p")}
    out = Path(__file__).resolve().parent / f"retention_{run.name}.json"
    atomic_write_json(out, clean_nan(res))
    print(json.dumps(clean_nan(res), indent=1))


if __name__ == "__main__":
    main()
