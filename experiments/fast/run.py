"""FAST experiment (issue 4): the default model, held-out pairs, gender and race.

For each task: causal tracing → stamp at the decisive layer → before/after BiaScope audit, plus the two
baselines (FT-L at matched dev SS, stamp with α = β = 0). Writes experiments/fast/results.json and
results.md (the committed outputs) and one run directory per task under experiments/fast/runs/<task>/
(summary.json and report.html are committed; patch and records are not).

Nothing is tuned on the held-out split: steps and lr were chosen on the gender dev split (diagnose.py), the other
hyper-parameters are the defaults of biaslab.methods.fast.FastConfig, and FT-L's checkpoint is matched on
dev SS.

Variants (``--variant``; each writes its own results file and run directories):
  gap  the paper's L_e (squared gap of the stereotype object), sessions 2-3: results.json / results.md,
       runs/<task>/ (FT-L at lr 1e-4 only, as it was run)
  js   L_e + JS divergence of the whole next-token distributions (``--fairness gap+js``, a named deviation),
       JS weight and α = β chosen on the race dev split (diagnose.py train race ...; see SETTINGS_JS), every
       held-out pair evaluated (no --limit), FT-L at lr 1e-4 and 1e-3: results_js.json / results_js.md,
       runs/<task>_js/

  js128 the js variant with L_s2 on 128-token windows and α = β = 5, re-selected on race dev after the js run's
       held-out perplexity exceeded the budget its (then too short) dev proxy had kept (see SETTINGS_JS128):
       results_js128.json / results_js128.md, runs/<task>_js128/

Run (CPU, ~1 thread; one process per task may run side by side, results merge):
  nice -n 10 .venv/bin/python experiments/fast/run.py [--variant gap|js|js128] [TASK ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = ("stereoset:gender", "stereoset:race")
# steps / lr chosen on the gender dev split (experiments/fast/diagnose.md: dev mean |gap| 1.44 -> 0.96 nats after
# 60 steps at lr 3e-3, 0.92 after 90; lr 1e-2 reached only 1.04 after 60; a stamp at layer 8 only 1.06 after 90);
# the layer is the tracing default (argmax of the single-layer MLP curve). limit 60 = the whole gender test split.
SETTINGS = dict(steps=60, lr=3e-3, limit=60, retention_limit=20, n_trace=12, n_noise=2, n_boot=1000, seed=0,
                ftl_lrs=(1e-4,), text_tokens=32)
# js variant (session 5): JS weight and α = β chosen on the race dev split by the rule fixed before the dev runs —
# the smallest dev |SS − 50| whose dev WikiText perplexity change (validation windows L_s2 never trains on) is
# ≤ +5 %, ties (within one dev pair) broken by the smaller KL on the subject templates (diagnose.md). Gender uses
# the same settings (its dev split, 18 pairs, is too small to select on).
# Race dev, 60 steps (diagnose.md): gap 69.8 (ppl +1.4 %); gap+js ×10 61.6 (+2.5 %); ×30 54.7 (+8.2 %, over);
# ×50 53.5 (+11.7 %, over); ×50 with α = β = 3 57.0 (+1.2 %, KL 0.0635); ×50, α = β = 5 59.3; ×100, α = β = 5 57.0
# (+0.5 %, KL 0.0639) → ×50, α = β = 3. FT-L also at lr 3e-3: at 1e-3 it reached only dev SS 61.6-62.8 in 60 steps,
# short of FAST's dev SS, so a larger rate gives it the chance to match.
SETTINGS_JS = dict(steps=60, lr=3e-3, fairness="gap+js", js_weight=50.0, alpha=3.0, beta=3.0, limit=None,
                   retention_limit=40, n_trace=12, n_noise=2, n_boot=1000, seed=0, ftl_lrs=(1e-4, 1e-3, 3e-3),
                   text_tokens=32)
# js128 variant (session 5, after the js run's held-out perplexity, +10.5 %, exceeded the budget its dev proxy
# said it kept, +1.2 %): the proxy was 32-token WikiText windows, while the retention benchmark scores 128-word
# windows given 64 words of context, and L_s2 itself trained on 32-token windows only. Both fixed: L_s2 on
# 128-token windows; dev retention = the benchmark's own protocol on 20 *validation* windows. Re-selected on race
# dev with the same rule (smallest dev |SS − 50| with dev perplexity ≤ +5 %, ties by subject KL): ×50, α = β = 3
# (the js choice) now measures +5.7 % (infeasible); 128-token windows: ×50, α = β = 3 55.8 (+2.9 %); ×50, α = β = 5
# 54.7 (+1.8 %); ×50, α = β = 10 60.5 (+1.5 %); ×30, α = β = 3 58.1 (+3.1 %); ×100, α = β = 10 60.5 (+1.6 %)
# → ×50, α = β = 5, 128-token windows. The held-out pairs are the same as the js run's: a second look at them.
SETTINGS_JS128 = {**SETTINGS_JS, "alpha": 5.0, "beta": 5.0, "text_tokens": 128}
VARIANTS = {"gap": (SETTINGS, "results", ""), "js": (SETTINGS_JS, "results_js", "_js"),
            "js128": (SETTINGS_JS128, "results_js128", "_js128")}


def task_result(s: dict) -> dict:
    """This script's results shape from a runner summary: retention metrics beside the BiaScope ones, each baseline
    (a control of the run) with its description and its metrics versus the unedited model."""
    ret = (s.get("retention") or {}).get("benchmarks", {}).get("retention", {}).get("metrics", {})
    d = s["details"]
    return {"layer": d["layer"], "metrics": {**s["metrics"], **ret}, "dev_ss": d["dev_ss"], "dev": d["dev"],
            "pairs": d["pairs"], "timings_s": s["timings_s"],
            "baselines": {name: {**d["baselines"].get(name, {}), "metrics": c["metrics"]}
                          for name, c in s["controls"].items()}}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BIASLAB_THREADS", "1")))
    from biaslab.evaluation import run_mitigation
    from biaslab.models import load_model
    from biaslab.runs import atomic_write_json, atomic_write_text

    args = sys.argv[1:]
    variant = "gap"
    if args[:1] == ["--variant"]:
        variant, args = args[1], args[2:]
    settings, stem, suffix = VARIANTS[variant]
    if any(settings.get(k, 0) is None for k in ("js_weight", "alpha", "beta")):
        raise SystemExit(f"variant {variant}: settings not chosen yet: {settings}")
    lm = load_model("smollm2-135m-instruct")
    tasks = args or TASKS
    results = {"model": lm.spec, "fingerprint": lm.fingerprint, "variant": variant, "settings": settings, "tasks": {}}
    t0 = time.time()
    path = HERE / f"{stem}.json"

    def save():  # merge with tasks another process of the same variant and settings wrote (one process per task)
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old.get("settings") == json.loads(json.dumps(settings)) and old.get("variant") == variant:
            results["tasks"] = {**{k: v for k, v in old.get("tasks", {}).items() if k not in tasks}, **results["tasks"]}
        atomic_write_json(path, results)
        atomic_write_text(HERE / f"{stem}.md", markdown(results))

    for task in tasks:
        name = task.split(":")[-1] + suffix
        cfg = {k: v for k, v in settings.items() if k not in ("limit", "n_boot", "seed")}
        s = run_mitigation("fast", lm, task, cfg, out=HERE / "runs" / name, force=True, limit=settings["limit"],
                           n_boot=settings["n_boot"], seed=settings["seed"])
        results["tasks"][task] = task_result(s)
        results["tasks"][task]["wall_s"] = round(time.time() - t0, 1)
        save()  # after every task, so a partial run still reports
    print(markdown(results))


def _f(v, d=1):
    return "n/a" if v is None else f"{v:.{d}f}"


def _pct_ci(ci) -> str:
    """' [lo, hi]' in percent, or '' for runs made before the summary recorded the relative change's CI."""
    return f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else ""


def markdown(res: dict) -> str:
    rows = ["| task | layer | method | \\|SS−50\\| before → after | mean \\|gap\\| (nats) | PS (wrappers) | PS (CrowS) | RS | "
            "LMS Δ | ICAT Δ | perplexity Δ% | knowledge Δ |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in res["tasks"].items():
        variants = [("FAST", r["metrics"])] + [(k, b["metrics"]) for k, b in r["baselines"].items()]
        for name, m in variants:
            def g(k, f="after"):
                return m.get(k, {}).get(f)
            ppl = m.get("perplexity", {})
            rel = ppl.get("relative_change")
            rows.append(
                f"| {task} | {r['layer']['used']} | {name} | {_f(g('ss_abs_dev', 'before'))} → {_f(g('ss_abs_dev'))} "
                f"(SS {_f(g('ss', 'before'))} → {_f(g('ss'))}, Δ CI {m['ss'].get('delta_ci95') and [round(x, 1) for x in m['ss']['delta_ci95']]}) | "
                f"{_f(g('ss_mean_abs_gap', 'before'), 2)} → {_f(g('ss_mean_abs_gap'), 2)} | "
                f"{_f(g('ps', 'before'))} → {_f(g('ps'))} | {_f(g('ps_crows', 'before'))} → {_f(g('ps_crows'))} | "
                f"{_f(g('rs'))} | {_f(g('lms', 'delta'))} | {_f(g('icat', 'delta'))} | "
                f"{_f(None if rel is None else 100 * rel, 2)}{_pct_ci(ppl.get('relative_change_ci95'))} | "
                f"{_f(g('knowledge_accuracy', 'delta'), 3)} |")
    title = ("FAST-style fairness stamp on smollm2-135m-instruct (held-out pairs)" if res.get("variant", "gap") == "gap"
             else "FAST-style fairness stamp, L_e + JS (`--fairness gap+js`), on smollm2-135m-instruct (held-out pairs)")
    out = [f"# {title}", "",
           f"Settings: `{json.dumps(res['settings'])}`; wall time per task (s, shared 2-core CPU): "
           f"{ {t: r.get('wall_s', res.get('wall_s')) for t, r in res['tasks'].items()} }.", "",
           *rows, "",
           "SS/PS: % of pairs preferring the stereotyped group (50 ideal). RS: % of hand-written commonsense pairs "
           "whose preference is unchanged (original = 100). LMS/ICAT: StereoSet held-out clusters. Perplexity: "
           "WikiText-2 test windows (retention benchmark). FT-L is matched to FAST on *dev* SS.", ""]
    for task, r in res["tasks"].items():
        out.append(f"- {task}: pairs {r['pairs']['split']}, evaluation sets {r['pairs'].get('eval_sizes')}, skipped "
                   f"{r['pairs']['skipped']}, dev SS {r['dev_ss']}"
                   + (f", dev mean |gap| {r['dev']['before']['mean_abs_gap']:.3f} → {r['dev']['after']['mean_abs_gap']:.3f}"
                      if r.get("dev") else ""))
        ftl = r["baselines"].get("ft_l")
        if ftl and ftl.get("candidates"):
            out.append(f"  - FT-L kept: lr {ftl['chosen_lr']:g}, step {ftl['chosen_step']} (dev SS {ftl['dev_ss']:.1f}, "
                       f"dev mean |gap| {ftl['dev_mean_abs_gap']:.3f}); tried: " + "; ".join(
                           f"lr {c['lr']:g}: step {c['chosen_step']}, dev SS {c['dev_ss']:.1f}, |gap| {c['dev_mean_abs_gap']:.3f}"
                           for c in ftl["candidates"]))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
