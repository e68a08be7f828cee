"""FAST experiment (issue 4): the default model, held-out pairs, gender and race.

For each task: causal tracing → stamp at the decisive layer → before/after BiaScope audit, plus the two
baselines (FT-L at matched dev SS, stamp with α = β = 0). Writes experiments/fast/results.json and
results.md (the committed outputs) and one run directory per task under experiments/fast/runs/<task>/
(summary.json and report.html are committed; patch and records are not).

Nothing is tuned on the held-out split: steps and lr were chosen on the gender dev split (diagnose.py), the other
hyper-parameters are the defaults of biaslab.mitigations.fast.FastConfig, and FT-L's checkpoint is matched on
dev SS.

Run (CPU, ~1 thread):  nice -n 10 .venv/bin/python experiments/fast/run.py
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
SETTINGS = dict(steps=60, lr=3e-3, limit=60, retention_limit=20, n_trace=12, n_noise=2, n_boot=1000, seed=0)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BIASLAB_THREADS", "1")))
    from biaslab.commands.fast import mitigate_fast
    from biaslab.models import load_model
    from biaslab.runs import atomic_write_json, atomic_write_text

    lm = load_model("smollm2-135m-instruct")
    tasks = sys.argv[1:] or TASKS
    results = {"model": lm.spec, "fingerprint": lm.fingerprint, "settings": SETTINGS, "tasks": {}}
    t0 = time.time()
    for task in tasks:
        name = task.split(":")[-1]
        s = mitigate_fast(lm, task, out=HERE / "runs" / name, force=True, **SETTINGS)
        results["tasks"][task] = {k: s[k] for k in ("layer", "metrics", "baselines", "dev_ss", "pairs", "timings_s")}
        results["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(HERE / "results.json", results)  # after every task, so a partial run still reports
        atomic_write_text(HERE / "results.md", markdown(results))
    results["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(HERE / "results.json", results)
    atomic_write_text(HERE / "results.md", markdown(results))
    print(markdown(results))


def _f(v, d=1):
    return "n/a" if v is None else f"{v:.{d}f}"


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
                f"{_f(None if rel is None else 100 * rel, 2)} | {_f(g('knowledge_accuracy', 'delta'), 3)} |")
    out = ["# FAST-style fairness stamp on smollm2-135m-instruct (held-out pairs)", "",
           f"Settings: `{json.dumps(res['settings'])}`; wall time {res.get('wall_s')} s (shared 2-core CPU).", "",
           *rows, "",
           "SS/PS: % of pairs preferring the stereotyped group (50 ideal). RS: % of hand-written commonsense pairs "
           "whose preference is unchanged (original = 100). LMS/ICAT: StereoSet held-out clusters. Perplexity: "
           "WikiText-2 test windows (retention benchmark). FT-L is matched to FAST on *dev* SS.", ""]
    for task, r in res["tasks"].items():
        out.append(f"- {task}: pairs {r['pairs']['split']}, skipped {r['pairs']['skipped']}, "
                   f"dev SS {r['dev_ss']}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
