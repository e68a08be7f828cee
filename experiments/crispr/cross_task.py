"""Other-task retention: the patch fitted on one task evaluated on the other task's held-out test items
(SST-2 patch on BBQ-Age, BBQ-Age patch on SST-2), against that run's unpatched ``before`` records.
Writes experiments/crispr/cross_task.json.

Run: ``nice -n 10 .venv/bin/python experiments/crispr/cross_task.py``"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PAIRS = [("runs/crispr-sst2", "runs/crispr-bbq-age"), ("runs/crispr-bbq-age", "runs/crispr-sst2")]


def main() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from ablations import load_records

    from biaslab import stats
    from biaslab.mitigations import crispr as C
    from biaslab.models import load_model
    from biaslab.patches import load_patch
    from biaslab.runs import atomic_write_json, clean_nan
    from biaslab.tasks import load_task

    out_path = Path(__file__).resolve().parent / "cross_task.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    lm = None
    for patch_run, eval_run in PAIRS:
        key = f"{Path(patch_run).name} -> {Path(eval_run).name}"
        if key in res or not (Path(patch_run) / "patch.safetensors").is_file() or not (Path(eval_run) / "summary.json").is_file():
            continue
        lm = lm or load_model("smollm2-135m-instruct")
        lm.progress = False
        man = json.loads((Path(eval_run) / "manifest.json").read_text())["args"]
        summ = json.loads((Path(eval_run) / "summary.json").read_text())
        cfg = C.CrisprConfig(**{**man["config"], "search": False, "neurons": 0})
        task, items = load_task(man["task"])
        _, test = C.split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
        test_items = C.sample_items(test, man["test_limit"], man["test_seed"])
        assert C.ids_hash(test_items) == summ["evaluation"]["test_ids_hash"]
        before = load_records(Path(eval_run) / "before" / "records.jsonl")
        patch = load_patch(Path(patch_run) / "patch.safetensors")
        after = C.score_resumable(lm, test_items, list(range(cfg.instructions)), protocol=cfg.protocol, patch=patch,
                                  desc=key)
        block = {"patch_task": patch.provenance.get("task"), "eval_task": task, "n_neurons": patch.n_neurons,
                 "n_test_items": len(test_items), "metrics": {}}
        for m in C.task_metrics(task):
            b = stats.paired_bootstrap(before, after, C.per_instruction(m.fn), n_boot=1000, seed=0)
            block["metrics"][m.name] = {k: b[k] for k in ("before", "after", "delta", "delta_ci95", "p")}
        res[key] = block
        atomic_write_json(out_path, clean_nan(res))
        print(key, json.dumps(block["metrics"]["accuracy"]), flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
