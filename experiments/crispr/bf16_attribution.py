"""Does CRISPR choose the same neurons in bfloat16 (biaslab's default on a GPU) as in float32?

Runs CRISPR's attribution (activation × gradient, confusion-weighted, skill-disentangled: ``trial_scores``) on the
default model in float32 and in bfloat16 on the same dev instances, for several seeded instance samples, and
compares the neuron rankings: overlap of the top-k sets, Spearman correlation over every neuron, and whether the
preset's chosen neurons are the same. As a yardstick, float32 on one sample is compared with float32 on the next
sample: how much the ranking moves with the instances alone.

bf16 runs on the CPU here (PyTorch's CPU bf16 kernels); a GPU accumulates in other orders, so this measures the
bf16 rounding of weights, activations and gradients, not a GPU's kernels (bench/gpu_check.sh has the GPU side).

Run: .venv/bin/python experiments/crispr/bf16_attribution.py  (about 10 minutes on 2 CPU cores)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from biaslab import attribution as attr
from biaslab.methods.crispr.config import CrisprConfig, resolve_instructions
from biaslab.methods.crispr.scores import trial_scores
from biaslab.methods.crispr.selection import split_dev_test, top_units
from biaslab.models import load_model
from biaslab.task_specs import load_task

TOP_K = (4, 16, 50, 100, 500)


def flat(scores: dict) -> torch.Tensor:
    return torch.cat([scores[k].float().reshape(-1) for k in sorted(scores)])


def top_set(scores: dict, k: int) -> set:
    return {(name, u) for name, u, _ in attr.rank_neurons(scores, k)}


def compare(a: dict, b: dict, n_chosen: int) -> dict:
    out = {f"top{k}_overlap": len(top_set(a, k) & top_set(b, k)) / k for k in TOP_K}
    out["spearman_all_neurons"] = attr.spearman(flat(a), flat(b))
    out[f"same_{n_chosen}_chosen"] = top_units(a, n_chosen) == top_units(b, n_chosen)
    return out


def run_task(task: str, protocol: str, samples: int, n_chosen: int, dev_size: int) -> dict:
    name, items = load_task(task)
    cfg = resolve_instructions(CrisprConfig(protocol=protocol, instructions=3, dev_size=dev_size,
                                            trials=1, neurons=n_chosen).validate(), items)
    dev, _ = split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    models = {d: load_model(dtype=d, progress=False) for d in ("float32", "bfloat16")}
    for lm in models.values():
        lm.progress = False
    per_sample, scores_f32, seconds = [], [], {"float32": 0.0, "bfloat16": 0.0}
    for s in range(samples):
        c = dataclasses.replace(cfg, trial_seed=s)
        got = {}
        for d, lm in models.items():
            t = time.perf_counter()
            got[d], _ = trial_scores(lm, dev, c)
            seconds[d] += time.perf_counter() - t
        scores_f32.append(got["float32"])
        per_sample.append({"trial_seed": s, **compare(got["float32"], got["bfloat16"], n_chosen)})
    across = [compare(scores_f32[s], scores_f32[s + 1], n_chosen) for s in range(samples - 1)]

    def summary(rows: list[dict]) -> dict:
        keys = [k for k in rows[0] if k != "trial_seed"]
        return {k: {"values": [r[k] for r in rows], "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)}
                for k in keys}
    return {"task": name, "protocol": protocol, "dev_size": dev_size, "instructions": cfg.instructions,
            "samples": samples, "n_neurons_total": int(flat(scores_f32[0]).numel()),
            "bf16_vs_fp32_same_instances": summary(per_sample),
            "fp32_vs_fp32_next_sample": summary(across),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--dev-size", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("bf16_attribution.json"))
    a = ap.parse_args()
    out = {"model": "smollm2-135m-instruct", "runs": [
        run_task("sst2", "cloze", a.samples, 4, a.dev_size),            # the make-demo preset: 4 neurons chosen
        run_task("bbq:Age", "letter", a.samples, 10, a.dev_size),       # the paper's setting, CrisprConfig's 10
    ]}
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
