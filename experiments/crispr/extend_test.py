"""POST-HOC extension of a finished CRISPR run's test evaluation (decided after seeing the run's 200-item result,
whose CI included 0; the run itself stays the pre-specified primary result): the same patch, nothing re-fitted,
scored before / after on a larger stratified sample of the same held-out test split (the run's items are a
subset, their records are reused), and, with --control-seeds, the run's random controls (same seeds, same units)
on the new items too.
Also the constant-answer check: CRISPR minus answering its most frequent letter everywhere.
Writes experiments/crispr/extended_<run>.json.

``--fresh K``: a CONFIRMATORY replication instead — ``--limit`` new test items drawn (stratified, seed
``--fresh-seed``) from the held-out test split minus every item of the K-item sample an earlier extension scored
(which includes the run's own items), so none of them was ever scored; before / after / controls are all scored
anew on them and nothing of the run's records is reused. Writes experiments/crispr/confirm_<run>.json.

``--units-from FILE:VARIANT`` (with ``--fresh``): confirm an *ablation variant* instead of the run's patch — the
units that ``ablations.py`` recorded for VARIANT in FILE (nothing re-fitted), on fresh items, with random controls
of the same site counts that exclude those units. Writes experiments/crispr/confirm_<run>_<variant>.json.
``--instructions I …`` (with ``--fresh``): score under other instructions than the run's (suffix ``_<M>instr``).

Run: ``nice -n 10 .venv/bin/python experiments/crispr/extend_test.py --run runs/crispr-v2-bbq-age --limit 600``
or ``… --run experiments/crispr/bbq_age --fresh 600 --limit 600 --control-seeds 3 --threads 2``"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/crispr-v2-bbq-age")
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--control-seeds", type=int, default=0)
    ap.add_argument("--fresh", type=int, default=0, help="exclude the first K-item sample; score new items only")
    ap.add_argument("--fresh-seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--units-from", default=None, metavar="FILE:VARIANT",
                    help="with --fresh: confirm the units ablations.py recorded for VARIANT in FILE")
    ap.add_argument("--instructions", type=int, nargs="+", default=None, metavar="I",
                    help="with --fresh: score under these instructions instead of the run's (e.g. all 10)")
    args = ap.parse_args()
    if args.instructions and not args.fresh:
        ap.error("--instructions needs --fresh (the run's own records are under the run's instructions)")
    if args.units_from and not args.fresh:
        ap.error("--units-from needs --fresh (an ablation variant is confirmed on never-scored items only)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from biaslab import attribution as attr
    from biaslab import stats
    from biaslab.methods import crispr as C
    from biaslab.evaluation.compare import score_mc_resumable
    from biaslab.patches import NeuronMaskPatch
    from biaslab.runs import RunDir, atomic_write_json, clean_nan
    from finished_run import open_run

    fr = open_run(args.run)
    run, lm, patch, task, cfg = fr.path, fr.lm, fr.patch, fr.task, fr.cfg
    variant = None
    if args.units_from:
        file, _, variant = args.units_from.rpartition(":")
        recorded = json.loads(Path(file).read_text())
        if variant not in recorded.get("variants", {}):
            raise SystemExit(f"{file}: no variant {variant!r}; it has {sorted(recorded.get('variants', {}))}")
        v = recorded["variants"][variant]
        patch = NeuronMaskPatch.from_units(lm, v["units"], sites=cfg.sites,
                                           params={"method": f"crispr-ablation:{variant}", "config": v["config"],
                                                   "from": file})
    orig = fr.test_items
    if args.fresh:
        seen = C.sample_items(fr.test, args.fresh, fr.args["test_seed"])
        have = {it.id for it in seen}
        assert {it.id for it in orig} <= have, "the run's test items are not inside the excluded sample"
        pool = [it for it in fr.test if it.id not in have]
        big = new = C.sample_items(pool, args.limit, args.fresh_seed)
        load = lambda name: []  # noqa: E731 - nothing earlier is reused: every record is scored anew
        ext = Path("runs") / (f"confirm_{run.name}" + (f"_{variant}" if variant else ""))
    else:
        big = C.sample_items(fr.test, args.limit, fr.args["test_seed"])
        have = {it.id for it in orig}
        assert have <= {it.id for it in big}, "the run's test items are not a subset of the larger sample"
        new = [it for it in big if it.id not in have]
        load = fr.records
        ext = run / "extended"
    instr = fr.summary["evaluation"]["instructions"]
    suffix = (f"_{variant}" if variant else "")
    if args.instructions and args.instructions != instr:
        instr = list(args.instructions)
        suffix += f"_{len(instr)}instr"
        ext = ext.with_name(ext.name + f"_{len(instr)}instr")

    rb = RunDir(ext / "before", {"items": C.ids_hash(new), "instructions": instr, "patch": None})
    ra = RunDir(ext / "after", {"items": C.ids_hash(new), "instructions": instr, "patch": patch.describe()})
    before = load("before") + score_mc_resumable(lm, new, instr, protocol=cfg.protocol, run=rb, desc="before+")
    after = load("after") + score_mc_resumable(lm, new, instr, protocol=cfg.protocol, run=ra, patch=patch, desc="after+")
    res = {"run": str(run), "task": task, "post_hoc": True, "n_test_items": len(big), "n_new_items": len(new),
           "confirmatory_fresh_items": bool(args.fresh), "excluded_sample": args.fresh or None,
           "instructions": instr, "n_neurons": patch.n_neurons, "test_ids_hash": C.ids_hash(big), "metrics": {},
           "variant": variant, "units": {k: v.tolist() for k, v in patch.units.items()},
           "fit_instructions": fr.summary["evaluation"]["instructions"]}
    mv_before, mv_after = C.metric_values(before, C.task_metrics(task)), C.metric_values(after, C.task_metrics(task))
    for m in C.task_metrics(task):
        b = stats.paired_bootstrap(before, after, C.per_instruction(m.fn), n_boot=1000, seed=0)
        res["metrics"][m.name] = {**{k: b[k] for k in ("before", "after", "delta", "delta_ci95", "p")},
                                  "std_before": mv_before[m.name]["std_over_instructions"],
                                  "std_after": mv_after[m.name]["std_over_instructions"],
                                  "per_instruction_before": mv_before[m.name]["per_instruction"],
                                  "per_instruction_after": mv_after[m.name]["per_instruction"]}
    if args.control_seeds:
        counts = {k: int(v.numel()) for k, v in patch.units.items()}
        chosen = {k: v.tolist() for k, v in patch.units.items()}
        sizes = {st.name: st.n_units for st in attr.resolve_sites(lm, cfg.sites)}
        pooled = []
        for sd in range(args.control_seeds):
            cp = NeuronMaskPatch.from_units(lm, C.random_units(sizes, counts, sd, exclude=chosen), sites=cfg.sites,
                                            params={"method": "random-control", "seed": sd,
                                                    "matched_to": "crispr site counts"})
            old_c = load(f"control/seed{sd}")
            rc = RunDir(ext / f"control_seed{sd}", {"items": C.ids_hash(new), "instructions": instr,
                                                     "patch": cp.describe()})
            recs = old_c + score_mc_resumable(lm, new, instr, protocol=cfg.protocol, run=rc, patch=cp, desc=f"control{sd}+")
            pooled += [{**r, "control_seed": sd} for r in recs]
        res["control"] = {"n_seeds": args.control_seeds, "metrics": {}}
        for m in C.task_metrics(task):
            per_seed = [C.per_instruction(m.fn)([r for r in pooled if r["control_seed"] == sd])
                        for sd in range(args.control_seeds)]
            b = stats.paired_bootstrap(pooled, after, C.per_instruction(m.fn), n_boot=1000, seed=0)
            res["control"]["metrics"][m.name] = {"value": b["before"], "per_seed": per_seed,
                                                 "crispr_minus_control": b["delta"],
                                                 "crispr_minus_control_ci95": b["delta_ci95"], "p": b["p"]}
    maj = Counter(r["pred"] for r in after).most_common(1)[0][0]
    const = [{**r, "pred": maj, "correct": int(r["gold"] == maj)} for r in before]
    acc = lambda rs: sum(r["correct"] for r in rs) / len(rs)  # noqa: E731
    b = stats.paired_bootstrap(const, after, acc, n_boot=1000, seed=0)
    res["constant_letter_check"] = {"majority_letter": "ABCDEFGH"[maj], "constant_accuracy": b["before"],
                                    "delta": b["delta"], "delta_ci95": b["delta_ci95"], "p": b["p"]}
    res["answer_shares"] = {name: {"ABCDEFGH"[k]: v / len(rs) for k, v in sorted(Counter(r["pred"] for r in rs).items())}
                            for name, rs in (("before", before), ("after", after))}
    out = Path(__file__).resolve().parent / (f"{'confirm' if args.fresh else 'extended'}_{run.name}{suffix}.json")
    atomic_write_json(out, clean_nan(res))
    print(json.dumps(clean_nan(res), indent=1))


if __name__ == "__main__":
    main()
