"""Supplement to run.py: SS and PS on the *edited* (training-split) pairs, the paper's own protocol.

FAST's SS is measured on the biased knowledge that was edited, and PS on paraphrases of it; run.py reports the
harder held-out protocol the issue asks for (new statements). This script loads each task's saved stamp
(experiments/fast/runs/<task>/patch.safetensors) and scores a seeded sample of the training pairs and their
vendored paraphrases before and after, with paired-bootstrap CIs. Writes edited_pairs.json / edited_pairs.md.

Run after run.py:  nice -n 10 .venv/bin/python experiments/fast/edited_pairs.py
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.set_num_threads(1)
    from biaslab import stats
    from biaslab.benchmarks.base import stratified_sample
    from biaslab.methods.fast import biascope as B
    from biaslab.methods import fast as F
    from biaslab.models import load_model
    from biaslab.patches import load_patch
    from biaslab.runs import atomic_write_json, atomic_write_text

    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    para = F.load_paraphrases()
    out, lines = {}, ["# FAST stamp on the edited (training-split) pairs — the paper's SS/PS protocol", "",
                      "| task | set | n pairs | before | after | Δ | Δ 95% CI |", "|---|---|---|---|---|---|---|"]
    for task in ("gender", "race"):
        run = HERE / "runs" / task
        if not (run / "patch.safetensors").is_file():
            continue
        summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        seed = summ.get("patch", {}).get("params", {}).get("seed", 0)
        pairs, _ = F.build_stereoset_pairs((task,))
        train = F.split_pairs(pairs, seed=seed)["train"]
        rows = [{"id": p.id, "bias_type": p.bias_type, "prompt_1": p.prompt_1, "prompt_2": p.prompt_2,
                 "object": p.object} for p in train]
        rows = stratified_sample(rows, 80, seed=seed, strata=("bias_type",))
        ps_rows = [{**r, "id": r["pair_id"]} for x in rows for r in para.get(x["id"], [])]
        patch = load_patch(run / "patch.safetensors")
        before = {"ss": B.score_pairs(lm, rows), "ps": B.score_pairs(lm, ps_rows)}
        with patch.applied(lm):
            after = {"ss": B.score_pairs(lm, rows), "ps": B.score_pairs(lm, ps_rows)}
        out[task] = {"layer": patch.params["layer"]}
        for name in ("ss", "ps"):
            for label, fn in ((name, B.ss), (f"{name}_abs_dev", B.ss_abs_dev), (f"{name}_mean_abs_gap", B.mean_abs_gap)):
                d = stats.paired_bootstrap(before[name], after[name], fn, n_boot=1000, seed=0)
                out[task][label] = d
                ci = d["delta_ci95"]
                lines.append(f"| {task} | {label} (train pairs{' paraphrased' if name == 'ps' else ''}) | {d['n_items']} | "
                             f"{d['before']:.2f} | {d['after']:.2f} | {d['delta']:+.2f} | "
                             f"[{ci[0]:.2f}, {ci[1]:.2f}] |")
    atomic_write_json(HERE / "edited_pairs.json", out)
    atomic_write_text(HERE / "edited_pairs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
