"""CRISPR ablations (the paper's Table: max→mean over tokens, no confusion weighting, no skill disentanglement)
on one task, at the n the main run chose on dev, on the main run's held-out test items.

Reuses the main run's ``before`` and ``after`` records (same test items, same instructions), so each ablation
costs one attribution + one test evaluation. Writes ``experiments/crispr/ablations_<task>.json``.

Run (after the main run): ``nice -n 10 .venv/bin/python experiments/crispr/ablations.py --run runs/crispr-sst2``
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

VARIANTS = {
    "full": {},
    "mean_over_tokens": {"reduce": "mean"},
    "no_confusion_weighting": {"confusion_weighting": False},
    "no_skill_disentanglement": {"skill_disentanglement": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="main run directory (biaslab mitigate crispr --out)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")

    from biaslab import stats
    from biaslab.methods import crispr as C
    from biaslab.evaluation import FitCache
    from biaslab.patches import load_patch
    from biaslab.evaluation.compare import score_mc_resumable
    from biaslab.models import load_model
    from biaslab.runs import atomic_write_json, clean_nan, read_records
    from biaslab.task_specs import load_task

    run = Path(args.run)
    man = json.loads((run / "manifest.json").read_text())["args"]
    lm = load_model(man["model"])
    lm.progress = False
    task, items = load_task(man["task"])
    base = C.CrisprConfig(**{**man["config"], "search": False, "neurons": 0})
    dev, test = C.split_dev_test(items, dev_fraction=base.dev_fraction, seed=base.split_seed)
    # phase 1 (can run while the main run is still searching): attribution of every variant, cached
    cache = run / "ablations"
    cache.mkdir(exist_ok=True)
    variant_scores = {}
    for name, kw in VARIANTS.items():
        if name == "full":
            continue
        path = cache / f"{name}.safetensors"
        if not path.is_file():
            scores, _ = C.trial_scores(lm, dev, replace(base, **kw))
            FitCache(path.parent).save_tensors(path.name, name, scores)
            print("attribution done:", name, flush=True)
        variant_scores[name] = FitCache(path.parent).load_tensors(path.name, name)[0]
    # phase 2: wait for the main run's summary (its chosen n and before/after records)
    while not (run / "summary.json").is_file():
        time.sleep(20)
    summary = json.loads((run / "summary.json").read_text())
    man = json.loads((run / "manifest.json").read_text())["args"]  # re-read: the main run may have been resized
    cfg = replace(base, neurons=summary["search"]["chosen_n"])
    test_items = C.sample_items(test, man["test_limit"], man["test_seed"])
    assert C.ids_hash(test_items) == summary["evaluation"]["test_ids_hash"], "test items differ from the main run"
    before = read_records(run / "before")
    metrics = C.task_metrics(task)
    instr = list(range(cfg.instructions))
    out_path = Path(args.out or f"experiments/crispr/ablations_{task.replace(':', '_')}.json")
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res.update({"task": task, "model": lm.spec, "n": cfg.neurons, "n_test_items": len(test_items),
                "instructions": instr, "main_run": str(run), "variants": res.get("variants", {})})
    for name, kw in VARIANTS.items():
        if name in res["variants"]:
            continue
        t = time.perf_counter()
        vcfg = replace(cfg, **kw)
        if name == "full":  # the main run's patch and records
            after = read_records(run / "after")
            units = {k: v.tolist() for k, v in load_patch(run / "patch.safetensors").units.items()}
        else:
            units = C.top_units(variant_scores[name], cfg.neurons)
            patch = C.make_patch(lm, units, vcfg, provenance={"task": task, "ablation": name})
            after = score_mc_resumable(lm, test_items, instr, protocol=cfg.protocol, patch=patch, desc=name)
        block = {"config": kw, "overlap_with_full_top_n": None, "metrics": {}}
        for m in metrics:
            b = stats.paired_bootstrap(before, after, C.per_instruction(m.fn), n_boot=args.n_boot, seed=0)
            mv = C.metric_values(after, [m])[m.name]
            block["metrics"][m.name] = {"after": b["after"], "before": b["before"], "delta": b["delta"],
                                        "delta_ci95": b["delta_ci95"], "std_after": mv["std_over_instructions"]}
        block["units"] = units
        block["seconds"] = round(time.perf_counter() - t, 1)
        res["variants"][name] = block
        atomic_write_json(out_path, clean_nan(res))
        print(name, {k: round(v["after"], 4) for k, v in block["metrics"].items() if v["after"] is not None}, flush=True)
    full = {(k, u) for k, us in res["variants"]["full"]["units"].items() for u in us}
    for name, block in res["variants"].items():
        mine = {(k, u) for k, us in block["units"].items() for u in us}
        block["overlap_with_full_top_n"] = len(mine & full) / max(1, len(full))
    atomic_write_json(out_path, clean_nan(res))


if __name__ == "__main__":
    main()
