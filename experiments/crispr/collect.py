"""Collect the CRISPR experiment outputs into committed files: experiments/crispr/results.json + results.md,
and each run's summary.json / report.html / patch / search.json under experiments/crispr/<run>/.

Run: ``.venv/bin/python experiments/crispr/collect.py`` (after run.sh). Prompt layout v2 runs only (the v1
numbers are in git history before commit 9ea39bb's follow-ups)."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from biaslab.runs import read_records

HERE = Path(__file__).resolve().parent
RUNS = {"sst2": Path("runs/crispr-v2-sst2"), "bbq_age": Path("runs/crispr-v2-bbq-age"),
        "sst2_cloze": Path("runs/crispr-cloze-sst2"), "sst2_cloze_10instr": Path("runs/crispr-cloze-sst2-10instr"),
        "sst2_cloze_10instr_n1": Path("runs/crispr-cloze-sst2-10instr-n1"),
        "bbq_age_optll": Path("runs/crispr-optll-bbq-age"), "bbq_age_optll_n3": Path("runs/crispr-optll-bbq-age-n3"),
        "bbq_age_optll_hmean": Path("runs/crispr-optll-bbq-age-hmean"),
        "bbq_age_optll_hmean32": Path("runs/crispr-optll-bbq-age-hmean32"),
        "bbq_gender_optll_hmean32": Path("runs/crispr-optll-bbq-gender-hmean32")}
LETTERS = "ABCDEFGH"



def std_table(metrics: dict, f) -> list[str]:
    """Markdown rows: each metric's before / after with the std over instructions and the per-instruction values."""
    rows = ["| metric | before ± std (per instr.) | after ± std (per instr.) |", "|---|---|---|"]
    for name, m in metrics.items():
        rows.append(f"| {name} | {f(m['before'])} ± {f(m['std_before'])} "
                    f"({', '.join(f(x) for x in m['per_instruction_before'])}) | {f(m['after'])} ± "
                    f"{f(m['std_after'])} ({', '.join(f(x) for x in m['per_instruction_after'])}) |")
    return rows

def f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def ci(c, d=3):
    return f"[{f(c[0], d)}, {f(c[1], d)}]" if c else "–"


def letter_shares(recs: list[dict], key: str = "pred", names=LETTERS) -> dict[str, float]:
    c = Counter(r[key] for r in recs)
    return {names[k]: round(c[k] / len(recs), 4) for k in sorted(c)} if recs else {}


def constant_letter_check(before: list[dict], after: list[dict], names=LETTERS) -> dict:
    """Diagnostic: accuracy of a constant answer per letter on the same test records, and a paired bootstrap of
    CRISPR's accuracy minus the constant answer CRISPR gives most often (picked from its predictions, no labels)."""
    from biaslab import stats
    from biaslab.methods.crispr.metrics import constant_answer

    n_opt = max(len(r["logprobs"]) for r in before)
    const = {names[k]: constant_answer(before, k) for k in range(n_opt)}
    acc = lambda rs: sum(r["correct"] for r in rs) / len(rs)  # noqa: E731
    maj = names[Counter(r["pred"] for r in after).most_common(1)[0][0]]
    b = stats.paired_bootstrap(const[maj], after, acc, n_boot=1000, seed=0)
    return {"constant_accuracy": {k: acc(v) for k, v in const.items()}, "majority_letter": maj,
            "delta": b["delta"], "delta_ci95": b["delta_ci95"], "p": b["p"]}


def unknown_check(recs: dict[str, list[dict]]) -> dict | None:
    """BBQ diagnostic: each condition's share of "unknown" answers, the accuracy of answering "unknown" to every
    item, and a paired bootstrap of CRISPR's accuracy minus that constant answer (None for tasks without an
    "unknown" option)."""
    from biaslab import stats

    if not recs["before"] or "unknown" not in recs["before"][0]:
        return None
    from biaslab.methods.crispr.metrics import constant_answer

    const = constant_answer(recs["before"], "unknown")
    acc = lambda rs: sum(r["correct"] for r in rs) / len(rs)  # noqa: E731
    b = stats.paired_bootstrap(const, recs["after"], acc, n_boot=1000, seed=0)
    return {"unknown_share": {k: sum(r["pred"] == r["unknown"] for r in v) / len(v) for k, v in recs.items()},
            "always_unknown_accuracy": acc(const), "delta": b["delta"], "delta_ci95": b["delta_ci95"]}


def criteria(s: dict) -> dict:
    """The issue's acceptance checks on the headline accuracy, computed from the summary (no thresholds tuned)."""
    m = s["metrics"]["accuracy"]
    c = s["control"]["metrics"].get("accuracy", {})
    lo_b = m["delta_ci95"][0] if m.get("delta_ci95") else None
    lo_c = c["crispr_minus_control_ci95"][0] if c.get("crispr_minus_control_ci95") else None
    std_ok = None
    if m.get("std_before") is not None and m.get("std_after") is not None:
        std_ok = m["std_after"] <= m["std_before"] + 1e-12
    return {"beats_before_ci_excludes_0": lo_b is not None and lo_b > 0,
            "beats_control_ci_excludes_0": lo_c is not None and lo_c > 0,
            "instruction_std_not_grown": std_ok,
            "n_instructions": len(s["evaluation"]["instructions"])}


def answer_names(s: dict):
    """How a run's answers are named: by letter, except under the cloze protocol, where the model answers with the
    option's word (the task's options)."""
    if not s["evaluation"]["protocol"].startswith("tasks.cloze"):
        return LETTERS
    from biaslab.task_specs import load_task

    return load_task(s["task"])[1][0].options


def run_section(s: dict, entry: dict) -> list[str]:
    """The results.md section of one run, from its summary and its collected entry."""
    ev = s["evaluation"]
    shares, letter_diag = entry["answer_letter_shares"], entry["constant_letter_check"]
    md: list[str] = []
    srch = s.get("search", {})
    how = ("fixed by --neurons" if srch.get("fixed") else
           f"chosen on dev by golden-section search, objective `{srch.get('objective', 'accuracy')}`")
    proto = "" if ev["protocol"].startswith("tasks.letter") else f", protocol `{ev['protocol']}`"
    md += [f"## {s['task']}: n = {s['patch']['n_neurons']} neurons pruned ({how}), {ev['n_test_items']} test items × "
           f"{len(ev['instructions'])} instruction(s){proto}", "",
           "| metric | before ± std(instr.) | after ± std | Δ after−before [95% CI] | random control (per seed) | "
           "Δ CRISPR−control [95% CI] |", "|---|---|---|---|---|---|"]
    for name, m in s["metrics"].items():
        c = s["control"]["metrics"].get(name, {})
        md.append(f"| {name} | {f(m['before'])} ± {f(m['std_before'])} | {f(m['after'])} ± {f(m['std_after'])} | "
                  f"{f(m['delta'])} {ci(m['delta_ci95'])} | {f(c.get('value'))} ({', '.join(f(x) for x in c.get('per_seed', []))}) | "
                  f"{f(c.get('crispr_minus_control'))} {ci(c.get('crispr_minus_control_ci95'))} |")
    cr = entry["criteria"]
    md += ["", f"Acceptance checks (accuracy): beats the unpruned model with CI excluding 0: "
               f"**{cr['beats_before_ci_excludes_0']}**; beats the random control with CI excluding 0: "
               f"**{cr['beats_control_ci_excludes_0']}**; std over instructions not grown: "
               f"**{cr['instruction_std_not_grown'] if cr['n_instructions'] > 1 else 'n/a (1 instruction)'}**.", "",
           "Answer-letter shares on the test records (what the model answers): "
           + "; ".join(f"{name}: {', '.join(f'{k} {v:.2f}' for k, v in sh.items())}" for name, sh in shares.items()),
           "",
           "Is the gain more than a change of answer letter? Accuracy of answering one letter for every test "
           "record: " + ", ".join(f"always {k} {f(v)}" for k, v in letter_diag["constant_accuracy"].items())
           + f". CRISPR's most frequent answer is {letter_diag['majority_letter']} (chosen from its predictions, "
           f"not from the gold labels); CRISPR − always-{letter_diag['majority_letter']}: "
           f"{f(letter_diag['delta'])} {ci(letter_diag['delta_ci95'])}.", ""]
    u = entry.get("unknown_check")
    if u:
        md += ["BBQ: share of \"unknown\" answers: " + ", ".join(f"{k} {v:.2f}" for k, v in u["unknown_share"].items())
               + f". Answering \"unknown\" to every item scores {f(u['always_unknown_accuracy'])}; CRISPR − "
               f"always-unknown: {f(u['delta'])} {ci(u['delta_ci95'])}.", ""]
    if srch.get("dev_accuracy"):
        pts = ", ".join(f"{k}: {f(v, 4)}" for k, v in sorted(srch["dev_accuracy"].items(), key=lambda kv: int(kv[0])))
        what = {"accuracy+goldprob": "dev accuracy + mean gold probability / (K + 1), K dev records",
                "condition-hmean": "harmonic mean of dev accuracy on ambiguous and on disambiguated items"
                }.get(srch.get("objective"), "dev accuracy")
        md += [f"Dev search (n: dev objective = {what}): {pts}", ""]
    g = entry.get("dev_grid")
    if g:  # dev-only check of small n the golden-section search skipped (sst2_dev_grid.py)
        md += [f"Dev grid of small n (same {g['dev_items']} dev items; `sst2_dev_grid.py`): "
               + ", ".join(f"n={n}: accuracy {f(v['accuracy'])}, gold prob {f(v['gold_prob'], 4)}, answers {v['answers']}"
                           for n, v in g["grid"].items()) + f"; best n on dev: {g['best_n_on_dev']}.", ""]
    md += [f"Bias neurons per layer: {s['patch']['neurons_per_layer']}", "",
           f"Timings (s, on the shared 2-core machine with one or two threads, see run.sh): {s.get('timings_s')}", ""]
    if s.get("notes"):
        md += ["Notes: " + " ".join(s["notes"]), ""]
    return md


def main() -> None:
    from biaslab.runs import atomic_write_json, atomic_write_text

    out = {"runs": {}, "ablations": {}, "retention": {}, "bench": None}
    # runs/ is not committed: a run whose directory is gone keeps the entry collected earlier (results.json) and
    # its committed summary.json, so re-collecting after a later session's runs changes none of the older numbers
    prev = json.loads((HERE / "results.json").read_text()).get("runs", {}) if (HERE / "results.json").is_file() else {}
    md = ["# CRISPR on SmolLM2-135M-Instruct — results (prompt layout v2)", "",
          "Generated by `experiments/crispr/collect.py` from the runs made by `experiments/crispr/run.sh`. "
          "All numbers are on held-out test items (never seen by attribution or the n search); values are means "
          "over instructions; CIs are 95 % paired bootstraps over items (all instructions of an item resampled "
          "together; 1000 resamples, seed 0). The random control prunes, per site, as many uniformly random FFN "
          "neurons as CRISPR pruned there (3 seeds, pooled).", ""]
    for key, run in RUNS.items():
        sp = run / "summary.json"
        if not sp.is_file() and key in prev and "criteria" in prev[key] and (HERE / key / "summary.json").is_file():
            s = json.loads((HERE / key / "summary.json").read_text())
            out["runs"][key] = prev[key]
            md += run_section(s, out["runs"][key])
            continue
        if not sp.is_file():
            srch = run / "search.json"
            if srch.is_file():  # the dev search chose n = 0: the test evaluation was skipped (after = before)
                sj = json.loads(srch.read_text())
                dst = HERE / key
                dst.mkdir(exist_ok=True)
                shutil.copy2(srch, dst / "search.json")
                acc = sj["dev_accuracy"]
                best = max(acc, key=lambda k: (acc[k], -int(k)))
                out["runs"][key] = {"search": {"dev_objective": acc, "objective": sj.get("objective", "accuracy"),
                                               "dev_items": sj.get("dev_limit"), "chosen_n": int(best)},
                                    "test_evaluation": None}
                pts = ", ".join(f"{k}: {f(v, 4)}" for k, v in sorted(acc.items(), key=lambda kv: int(kv[0])))
                head = (f"the dev search chose n = {best} — after = before, no test evaluation" if best == "0"
                        else f"search journal only (n = {best} so far) — run incomplete")
                md += [f"## {key}: {head}", "",
                       f"Dev search ({sj.get('dev_limit')} dev items, objective `{sj.get('objective', 'accuracy')}`; "
                       f"n: value): {pts}", ""]
            else:
                md += [f"## {key}: not run (no {sp})", ""]
            continue
        s = json.loads(sp.read_text())
        dst = HERE / key
        dst.mkdir(exist_ok=True)
        for name in ("summary.json", "report.html", "patch.safetensors", "search.json"):
            if (run / name).is_file():
                shutil.copy2(run / name, dst / name)
        names = answer_names(s)
        recs = {"before": read_records(run / "before"), "after": read_records(run / "after")}
        for k in range(s["control"]["n_seeds"]):
            recs[f"control seed {k}"] = read_records(run / "control" / f"seed{k}")
        shares = {name: letter_shares(r, names=names) for name, r in recs.items()}
        letter_diag = constant_letter_check(recs["before"], recs["after"], names)
        shares["gold"] = letter_shares(recs["before"], "gold", names)
        out["runs"][key] = {k: s[k] for k in ("task", "metrics", "control", "search", "evaluation", "timings_s", "notes")}
        out["runs"][key].update(n_neurons=s["patch"]["n_neurons"], neurons_per_layer=s["patch"]["neurons_per_layer"],
                                answer_letter_shares=shares, constant_letter_check=letter_diag,
                                criteria=criteria(s))
        if unknown_check(recs):
            out["runs"][key]["unknown_check"] = unknown_check(recs)
        grid = HERE / key / "dev_grid.json"
        if grid.is_file():  # dev-only check of small n the golden-section search skipped (sst2_dev_grid.py)
            out["runs"][key]["dev_grid"] = json.loads(grid.read_text())
        md += run_section(s, out["runs"][key])
    for p in sorted(HERE.glob("instructions_*.json")):
        r = json.loads(p.read_text())
        out.setdefault("instructions", {})[p.stem] = r
        md += [f"## Instruction robustness: {r['task']} patch ({r['n_neurons']} neurons) under instructions "
               f"{r['instructions']}, same {r['n_test_items']} test items (before / after only, no controls)", "",
               "| metric | before (per instruction) | after (per instruction) | std before | std after | "
               "Δ mean over instructions [95% CI] |", "|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            md.append(f"| {name} | {f(m['before'])} ({', '.join(f(x) for x in m['per_instruction_before'])}) | "
                      f"{f(m['after'])} ({', '.join(f(x) for x in m['per_instruction_after'])}) | {f(m['std_before'])} | "
                      f"{f(m['std_after'])} | {f(m['delta'])} {ci(m['delta_ci95'])} |")
        md.append("")
    for p in sorted(HERE.glob("extended_*.json")) + sorted(HERE.glob("confirm_*.json")):
        r = json.loads(p.read_text())
        out.setdefault("extended", {})[p.stem] = r
        cl = r["constant_letter_check"]
        if r.get("variant") and r["instructions"] != r.get("fit_instructions", r["instructions"]):
            md += [f"## Ablation variant `{r['variant']}` under {len(r['instructions'])} instructions: {r['task']}, the "
                   f"same {r['n_test_items']} fresh test items", "",
                   "Planned after the confirmatory test above and before scoring (session 4, `run_sst2_cloze.sh` step "
                   f"10): the variant's units, fitted under instructions {r['fit_instructions']}, scored under "
                   f"instructions {r['instructions']}; before / after only, descriptive (no success rule set).", "",
                   *std_table(r["metrics"], f), ""]
        elif r.get("variant"):
            md += [f"## CONFIRMATORY test of the ablation variant `{r['variant']}` on fresh items: {r['task']}, "
                   f"{r['n_neurons']} units {r['units']}, {r['n_test_items']} held-out test items never scored before", "",
                   "Pre-specified before scoring (session 4, `run_sst2_cloze.sh` step 9): the variant was picked after "
                   "its ablation result on the main run's test items, so it is tested here on items of the held-out "
                   f"test split outside that {r['excluded_sample']}-item sample; its units as recorded, nothing "
                   "re-fitted; random controls of the same site counts excluding those units. Success = the 95 % CIs "
                   "of after − before and of variant − control both exclude 0, and the std over instructions does "
                   "not grow.", "",
                   *std_table(r["metrics"], f), ""]
        elif r.get("confirmatory_fresh_items"):
            md += [f"## CONFIRMATORY replication on fresh test items: {r['task']} patch ({r['n_neurons']} neurons), "
                   f"{r['n_test_items']} held-out test items never scored before", "",
                   f"Pre-specified before scoring (session 3): the committed patch and its random controls (same seeds "
                   f"and units), unchanged, on items of the held-out test split outside the {r['excluded_sample']}-item "
                   "sample of the post-hoc extension (which holds the run's own 200); primary = accuracy, success = "
                   "the 95 % CIs of after − before and of CRISPR − control both exclude 0.", ""]
        else:
            md += [f"## POST-HOC larger test sample: {r['task']} patch ({r['n_neurons']} neurons), {r['n_test_items']} test "
                   f"items (the run's 200 + {r['n_new_items']} more from the same held-out split)", "",
                   "Decided after seeing the 200-item result above (whose CI included 0); the 200-item run remains the "
                   "pre-specified result. Nothing is re-fitted; the random controls are the run's (same seeds and units).", ""]
        md += ["| metric | before | after | Δ [95% CI] | random control (per seed) | Δ CRISPR−control [95% CI] |",
               "|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            c = r.get("control", {}).get("metrics", {}).get(name, {})
            md.append(f"| {name} | {f(m['before'])} | {f(m['after'])} | {f(m['delta'])} {ci(m['delta_ci95'])} | "
                      f"{f(c.get('value'))} ({', '.join(f(x) for x in c.get('per_seed', []))}) | "
                      f"{f(c.get('crispr_minus_control'))} {ci(c.get('crispr_minus_control_ci95'))} |")
        md += ["", f"Answer shares: {r['answer_shares']}. CRISPR − always-{cl['majority_letter']} "
                   f"(always-{cl['majority_letter']} accuracy {f(cl['constant_accuracy'])}): {f(cl['delta'])} "
                   f"{ci(cl['delta_ci95'])}.", ""]
    for p in sorted(HERE.glob("ablations_*.json")):
        a = json.loads(p.read_text())
        out["ablations"][a["task"]] = a
        for v in a["variants"].values():
            v.pop("units", None)
        md += [f"## Ablations on {a['task']} (n = {a['n']}, same {a['n_test_items']} test items)", "",
               "| variant | accuracy after | Δ vs before [95% CI] | std over instr. | overlap of pruned set with full |",
               "|---|---|---|---|---|"]
        for name, v in a["variants"].items():
            m = v["metrics"]["accuracy"]
            md.append(f"| {name} | {f(m['after'])} | {f(m['delta'])} {ci(m['delta_ci95'])} | {f(m['std_after'])} | "
                      f"{f(v.get('overlap_with_full_top_n'), 2)} |")
        md.append("")
    for p in sorted(HERE.glob("retention_*.json")):
        r = json.loads(p.read_text())
        out["retention"][p.stem] = r
        md += [f"## Retention of {r['patch']} ({r['n_neurons']} neurons), {r['limit']} items per benchmark", "",
               "| benchmark | metric | before | after | Δ [95% CI] | width of before's 95% CI | |Δ| ≤ width |",
               "|---|---|---|---|---|---|---|"]
        for b, sec in r["benchmarks"].items():
            for name, m in sec["metrics"].items():
                md.append(f"| {b} (n={sec['n_items']}) | {name} | {f(m['before'])} | {f(m['after'])} | "
                          f"{f(m['delta'])} {ci(m['delta_ci95'])} | {f(m.get('before_ci_width'))} | {m.get('within_ci_width')} |")
        o = r.get("other_task")
        if o:
            for name, m in o["metrics"].items():
                md.append(f"| other task {o['task']} (n={o['n_items']}) | {name} | {f(m['before'])} | {f(m['after'])} | "
                          f"{f(m['delta'])} {ci(m['delta_ci95'])} | | |")
        md.append("")
    bench = Path("bench/results/crispr_attribution.json")
    if bench.is_file():
        out["bench"] = json.loads(bench.read_text())
    atomic_write_json(HERE / "results.json", out)
    atomic_write_text(HERE / "results.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
