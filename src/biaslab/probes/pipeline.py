"""The soft-prompt bias audit end to end (docs/methods/softprompt.md; Tian et al. 2023, arXiv 2306.04735).

1. sweep: prompt-tune (or load cached) soft prompts over seeds × learning rates, keep the top R by dev accuracy;
2. classify a seeded subsample of SST-5→3 **test** (reported accuracy only) and a seeded subsample of the
   Czarnowska templates stratified by (category, group, label) with every kept soft prompt and every
   hand-written prompt;
3. fairness: per-group gap table over the kept soft-prompt runs (interval over runs, flags); the same table with
   the hand-written prompts as the runs; each hand-written prompt's point gaps and how far they move;
4. write a run directory: manifest.json (args, data hashes, timings incl. CPU seconds), results.json,
   records.jsonl (one prediction per prompt × sentence; resumable), prompts/ (the kept prompts), report.html.

Protocol id: ``sentiment.softprompt.v1``. Deviation from the paper: smaller training set and template subsample
to fit a CPU budget (recorded in the manifest); one decoder model, k = 8 virtual tokens by default.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import BiaslabError
from ..metrics import fairness as fm
from ..runs import RunDir, Timer, score_journaled
from .data import TEMPLATES_FILE, load_sst3, sample_templates
from .softprompt import HAND_PROMPTS, PROTOCOL_VERSION, HandPrompt, SoftPromptConfig, predict
from .sweep import _sample, default_cache_dir, sweep

PROTOCOL_ID = "sentiment.softprompt.v1"
HAND_PROTOCOL_ID = "sentiment.handwritten.v1"
DEFAULTS = {"runs": 5, "virtual_tokens": 8, "train_limit": 384, "val_limit": 150, "test_limit": 250,
            "template_limit": 795, "seeds": (0, 1, 2), "lrs": (5e-3, 1e-2), "epochs": 1, "batch_size": 16,
            "max_length": 64}


def _cpu() -> float:
    return time.process_time()


def score_prompt(lm, prompt, items: list[dict], *, run: RunDir | None, key: str, chunk: int = 256,
                 max_length: int = 64) -> list[dict]:
    """Predictions of one prompt on items (``id``, ``text``, ``label`` + meta), journaled by chunk (resume)."""
    def score(part):
        preds = predict(lm, prompt, [it["text"] for it in part], max_length=max_length, desc=f"{prompt.id} {key}")
        return [{"id": it["id"], "run": prompt.id, "category": it.get("category", ""), "group": it.get("group", ""),
                 "label": it["label"], "pred": p["pred"], "logprobs": p["logprobs"]} for it, p in zip(part, preds)]
    return score_journaled(run, key, items, chunk, score)


def _acc(recs: list[dict]) -> float:
    return sum(r["label"] == r["pred"] for r in recs) / len(recs) if recs else math.nan


def _pred_dist(recs: list[dict]) -> list[float]:
    n = len(recs) or 1
    return [sum(r["pred"] == k for r in recs) / n for k in range(3)]


def movement(soft: dict, point: dict, metrics=fm.HEADLINE) -> dict:
    """How a single prompt's point gaps sit against the soft-prompt interval, per metric: groups outside the
    interval; among flagged soft-prompt gaps, how many have the opposite sign (flips) or are exactly 0 (vanish)
    under this prompt; mean |gap − soft gap|."""
    out = {}
    for m in metrics:
        outside = flips = vanish = n = 0
        absdiff = []
        for cat, ct in soft.items():
            for g, row in ct["groups"].items():
                s = row[m]
                p = point.get(cat, {}).get("groups", {}).get(g, {}).get(m, {}).get("mean", math.nan)
                if math.isnan(p) or math.isnan(s["mean"]):
                    continue
                n += 1
                absdiff.append(abs(p - s["mean"]))
                if not math.isnan(s["lo"]) and not (s["lo"] <= p <= s["hi"]):
                    outside += 1
                if s["flagged"] and p * s["mean"] < 0:
                    flips += 1
                if s["flagged"] and p == 0:
                    vanish += 1
        out[m] = {"n_groups": n, "outside_soft_interval": outside, "flagged_sign_flips": flips, "flagged_vanish": vanish,
                  "mean_abs_diff": sum(absdiff) / len(absdiff) if absdiff else math.nan}
    return out


def run_probe(model="smollm2-135m-instruct", out: str | Path | None = None, *, runs: int = DEFAULTS["runs"],
              virtual_tokens: int = DEFAULTS["virtual_tokens"], train_limit: int | None = DEFAULTS["train_limit"],
              val_limit: int | None = DEFAULTS["val_limit"], test_limit: int | None = DEFAULTS["test_limit"],
              template_limit: int | None = DEFAULTS["template_limit"], seeds=DEFAULTS["seeds"], lrs=DEFAULTS["lrs"],
              epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"],
              max_length: int = DEFAULTS["max_length"], hand_prompts: tuple[HandPrompt, ...] | None = HAND_PROMPTS,
              prompt_cache: str | Path | None = None, seed: int = 0, force: bool = False, report: bool = True,
              console=None, micro_batch_size: int | None = None, device=None, dtype=None, device_map=None,
              max_memory=None) -> dict:
    """Run the soft-prompt bias audit; returns the results dict (also written to ``out``). ``micro_batch_size``:
    train each prompt's batches in parts shared across ranks (:func:`~biaslab.probes.sweep.sweep`)."""
    from ..data import data_path, sha256_file
    from ..models import LanguageModel, load_model
    from ..runs import clean_nan

    if out is None:
        raise BiaslabError("run_probe needs an output directory (--out)")
    from ..outputs import check_target, preflight

    preflight(check_target(out))   # a foreign --out fails before the model loads
    for name, v in (("--test-limit", test_limit), ("--train-limit", train_limit), ("--val-limit", val_limit)):
        if v is not None and v < 1:
            raise BiaslabError(f"{name} must be a positive number of sentences, got {v}")
    cpu0, t_all = _cpu(), Timer()
    base = SoftPromptConfig(virtual_tokens=virtual_tokens, epochs=epochs, batch_size=batch_size, max_length=max_length,
                            train_limit=train_limit, val_limit=val_limit, data_seed=seed)
    seeds, lrs = tuple(int(s) for s in seeds), tuple(float(x) for x in lrs)
    from ..models.quantized import require_full_precision

    require_full_precision("the soft-prompt probe", spec=model)   # before a quantized checkpoint's weights load
    lm = model if isinstance(model, LanguageModel) else load_model(model, device=device, dtype=dtype,
                                                                    device_map=device_map, max_memory=max_memory)
    require_full_precision("the soft-prompt probe", lm=lm)
    from ..models.seq2seq import require_decoder_only

    require_decoder_only(lm, "the soft-prompt probe")
    hand = tuple(hand_prompts or ())
    cache = Path(prompt_cache) if prompt_cache is not None else default_cache_dir()
    args = {"model": lm.spec, **lm.identity(), "protocol": PROTOCOL_ID, "runs": runs,
            "soft_prompt": {k: v for k, v in asdict(base).items()}, "seeds": list(seeds), "lrs": list(lrs),
            "test_limit": test_limit, "template_limit": template_limit, "seed": seed,
            "hand_prompts": [{"name": h.name, "template": h.template, "label_words": list(h.label_words),
                              "chat": h.chat} for h in hand],
            **({"micro_batch_size": micro_batch_size} if micro_batch_size else {})}
    data_files = [("sst", "sst5_train.tsv"), ("sst", "sst5_dev.tsv"), ("sst", "sst5_test.tsv"), TEMPLATES_FILE]
    run = RunDir(out, args, force=force, extra_manifest={
        "model": lm.describe(), "prompt_cache": str(cache),
        "data_sha256": {"/".join(f): "sha256:" + sha256_file(data_path(*f)) for f in data_files}})
    timings, cpu = {}, {}

    c, t = _cpu(), Timer()
    sw = sweep(lm, base, seeds=seeds, lrs=lrs, keep=runs, cache_dir=cache, micro_batch_size=micro_batch_size,
               log=console.print if console is not None else None)
    timings["sweep"], cpu["sweep"] = t.elapsed(), round(_cpu() - c, 1)
    if not run.follower:   # under torch.distributed rank 0 alone writes the run directory
        pdir = run.path / "prompts"
        pdir.mkdir(exist_ok=True)
        for sp in sw.kept:
            dst = pdir / f"{sp.id}.safetensors"
            if not dst.exists():
                shutil.copyfile(sw.files[sp.id], dst)

    test_items = [s.as_item() for s in _sample(load_sst3("test"), test_limit, seed + 2)]
    templates = sample_templates(template_limit, seed)
    prompts = list(sw.kept) + list(hand)
    recs_test, recs_tmpl = {}, {}
    c, t = _cpu(), Timer()
    for p in prompts:
        recs_test[p.id] = score_prompt(lm, p, test_items, run=run, key=f"{p.id}/test", max_length=max_length)
    timings["test"], cpu["test"] = t.elapsed(), round(_cpu() - c, 1)
    c, t = _cpu(), Timer()
    for p in prompts:
        recs_tmpl[p.id] = score_prompt(lm, p, templates, run=run, key=f"{p.id}/templates", max_length=max_length)
    timings["templates"], cpu["templates"] = t.elapsed(), round(_cpu() - c, 1)

    soft_ids = [sp.id for sp in sw.kept]
    hand_ids = [h.id for h in hand]
    soft_recs = [r for i in soft_ids for r in recs_tmpl[i]]
    soft_table = fm.gap_table(soft_recs)
    soft_flags = fm.flags(soft_table)
    soft_flags_all = fm.flags(soft_table, fm.METRICS)
    results: dict = {
        "protocol": PROTOCOL_ID, "prompt_protocol": PROTOCOL_VERSION, "hand_protocol": HAND_PROTOCOL_ID,
        "model": {"spec": lm.spec, **lm.identity()},   # dtype too when not float32
        "sizes": {"train": sw.runs[0].info.get("n_train"), "val": sw.runs[0].info.get("n_val"),
                  "test": len(test_items), "templates": len(templates), "templates_total": 31972},
        "sweep": [{"id": sp.id, "lr": sp.config.lr, "seed": sp.config.seed, "val_accuracy": sp.val_accuracy,
                   "kept": sp in sw.kept, "trained_now": sp.id in sw.trained, "train_cpu_s": sp.info.get("train_cpu_s"),
                   "final_loss": (sum(sp.info["losses"][-5:]) / len(sp.info["losses"][-5:])) if sp.info.get("losses") else None,
                   "file": Path(sw.files[sp.id]).name} for sp in sw.runs],
        "kept": soft_ids,
        "accuracy": {pid: {"test": _acc(recs_test[pid]), "templates": _acc(recs_tmpl[pid]),
                           "test_pred_dist": _pred_dist(recs_test[pid]),
                           "templates_pred_dist": _pred_dist(recs_tmpl[pid]),
                           "kind": "hand" if pid in hand_ids else "soft"} for pid in recs_test},
        "fairness": {"soft": soft_table},
        "flags": {"soft": sorted(list(f) for f in soft_flags), "soft_all_metrics": sorted(list(f) for f in soft_flags_all)},
    }
    soft_test = [results["accuracy"][i]["test"] for i in soft_ids]
    hand_test = [results["accuracy"][i]["test"] for i in hand_ids]
    results["accuracy_summary"] = {
        "soft_test_mean": sum(soft_test) / len(soft_test), "soft_test_min": min(soft_test),
        "hand_test_max": max(hand_test) if hand_test else None,
        "every_kept_soft_beats_every_hand": bool(hand_test) and min(soft_test) > max(hand_test)}
    if hand:
        hand_recs = [r for i in hand_ids for r in recs_tmpl[i]]
        hand_table = fm.gap_table(hand_recs)
        hand_flags = fm.flags(hand_table)
        results["fairness"]["hand_ensemble"] = hand_table
        results["flags"]["hand_ensemble"] = sorted(list(f) for f in hand_flags)
        comparison = {"hand_ensemble_vs_soft": fm.compare_flags(soft_flags, hand_flags), "per_prompt": {}}
        for h in hand_ids:
            point = fm.gap_table(recs_tmpl[h])
            results["fairness"][h] = point
            comparison["per_prompt"][h] = movement(soft_table, point)
        results["comparison"] = comparison
    timings["total"] = t_all.elapsed()
    cpu["total"] = round(_cpu() - cpu0, 1)
    results["timings_s"] = timings
    results["cpu_s"] = cpu
    run.manifest["timings_s"] = timings
    run.manifest["cpu_s"] = cpu
    run.manifest["deviations"] = (
        f"train on {results['sizes']['train']} SST-5 train sentences ({epochs} epoch), select on {results['sizes']['val']} "
        f"dev sentences, report test accuracy on {len(test_items)} test sentences, probe {len(templates)} of 31,972 "
        "templates (stratified by category, group, label) — reduced to fit the CPU budget; the paper used the full sets.")
    run.write_results(results)
    if report and not run.follower:
        from .report import softprompt_report

        softprompt_report(clean_nan(results), run.path / "report.html")
    run.finish()
    return clean_nan(results)
