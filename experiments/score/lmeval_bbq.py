"""`biaslab score` on an lm-evaluation-harness samples file reproduces lm-eval's own BBQ / CrowS-Pairs numbers.

    .venv/bin/pip install -e '.[bench]'          # lm-eval (see bench/README.md)
    HF_DATASETS_OFFLINE=1 .venv/bin/python experiments/score/lmeval_bbq.py [--bench bbq|crows] [--items 200]

1. samples --items BBQ items or CrowS pairs (biaslab's seeded, stratified sample), runs lm-eval's own BBQ
   multiple-choice (or CrowS-Pairs English) task on them (the local copy of bench/lmeval_tasks, the default model, no chat template) with log_samples, and
   writes the samples file with lm-eval's own writer (``EvaluationTracker.save_results_samples``, what
   ``lm_eval --log_samples`` writes: ``arguments`` as ``gen_args_i`` / ``arg_j``, responses as strings);
2. runs `biaslab score --bench BENCH --lmeval-samples FILE --partial` on that file;
3. compares lm-eval's numbers with biaslab's, on the same items. Output: experiments/score/lmeval_BENCH.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=("bbq", "crows"), default="bbq")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "score")
    a = ap.parse_args()
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from audit_throughput import lmeval_results, write_lmeval_inputs
    from biaslab.benchmarks import get_benchmark
    from biaslab.models.loading import embedded_model_dir

    b = get_benchmark(a.bench)
    task = f"biaslab_{a.bench}_local"
    if a.bench == "bbq":   # lm-eval's BBQ is upstream's: the 7 categories vendored from upstream (4 are regenerated)
        items = b.sample([it for it in b.load_items() if not it["id"].startswith("bbq-regen-")], a.items, 0)
    else:
        items = b.sample(b.load_items(), a.items, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_lmeval_inputs(Path(tmp), items if a.bench == "bbq" else [], items if a.bench == "crows" else [])
        hflm = HFLM(pretrained=str(embedded_model_dir("smollm2-135m-instruct")), device="cpu", dtype="float32",
                    batch_size=8)
        res = lm_eval.simple_evaluate(model=hflm, tasks=[task],
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      bootstrap_iters=0, log_samples=True, apply_chat_template=False, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, verbosity="WARNING")
    lme, _ = lmeval_results(res, task)
    with tempfile.TemporaryDirectory() as tmp:   # lm-eval's own writers, called as its CLI calls them
        tracker = EvaluationTracker(output_path=str(Path(tmp) / "results.json"))
        all_samples = res.pop("samples")
        tracker.save_results_aggregated(results=res, samples=all_samples)
        tracker.save_results_samples(task_name=task, samples=sorted(all_samples[task], key=lambda s: s["doc_id"]))
        (written,) = Path(tmp).glob(f"samples_{task}_*.jsonl")
        f = a.out / f"lmeval_{a.bench}_samples.jsonl"
        shutil.copyfile(written, f)
    run = Path(tempfile.mkdtemp()) / "score"
    out = subprocess.run([sys.executable, "-m", "biaslab", "score", "--bench", a.bench, "--lmeval-samples", str(f),
                          "--partial", "--n-boot", "1000", "--format", "json", "--out", str(run), "--name",
                          "smollm2-135m-instruct via lm-eval"], capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout)["benchmarks"][a.bench]
    n_items = sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    m = ours["metrics"]
    if a.bench == "bbq":
        theirs = {k: lme.get(k) for k in ("acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score",
                                          "disamb_bias_score")}
        mine = {"accuracy": m["accuracy"]["value"], "accuracy_ci95": m["accuracy"]["ci95"],
                "accuracy_ambig": m["accuracy_ambig"]["value"], "accuracy_disambig": m["accuracy_disambig"]["value"],
                "bias_score_ambig": m["bias_score_ambig"]["value"],
                "bias_score_disambig": m["bias_score_disambig"]["value"]}
        same = abs(lme["acc"] - m["accuracy"]["value"]) < 1e-9
    else:   # lm-eval's pct_stereotype is a share; biaslab's stereotype_score the same in %
        theirs = {k: lme.get(k) for k in ("pct_stereotype", "likelihood_diff")}
        mine = {"stereotype_score": m["stereotype_score"]["value"], "stereotype_score_ci95": m["stereotype_score"]["ci95"],
                "tie_rate": m.get("tie_rate", {}).get("value")}
        same = abs(100 * lme["pct_stereotype"] - m["stereotype_score"]["value"]) < 1e-9
    summary = {"bench": a.bench, "items": n_items, "lm_eval_version": getattr(lm_eval, "__version__", None),
               "lm_eval": theirs, "biaslab_score": {**mine, "scored": ours["predictions"]["scored"],
                                                    "unmatched": ours["predictions"]["unmatched"],
                                                    "docs_left_out": ours["predictions"].get("docs_left_out")},
               "same_headline": same,
               "samples_layout": "lm-eval EvaluationTracker.save_results_samples (arguments: gen_args_i/arg_j)",
               "samples_file": str(f.relative_to(ROOT))}
    (a.out / f"lmeval_{a.bench}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
