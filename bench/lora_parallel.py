"""SR_LLM's LoRA training shared across processes (issue 16, "Data parallel"): time and identity.

    python bench/lora_parallel.py [--steps 6] [--batch-size 8] [--micro-batch-size 4] [--out bench/results/lora_parallel.json]

On the embedded default model, the real training pairs (``data/debias_rewrites``, the method's seeded sample),
``--steps`` optimizer steps with validation every 3 steps, in three layouts:

1. one process, 2 threads, no ``--micro-batch-size`` (the default path: each batch in one piece);
2. one process, 2 threads, ``--micro-batch-size`` (the parts one after another);
3. ``torchrun --nproc_per_node=2``, 1 thread each, the same ``--micro-batch-size`` (the parts shared).

It records the training seconds per step of each and whether layouts 2 and 3 trained the same adapter (a sha256 of
its tensors) with the same losses. A 2-core machine cannot show a speed-up from a second process (both layouts use
the same two cores); the ratio is reported anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys, time
from biaslab import distributed as D
D.init_from_env()
from biaslab.models import load_model
from biaslab.methods.srllm import data as sd
from biaslab.methods.srllm.config import SRLLMConfig
from biaslab.methods.srllm.training import train_lora
steps, batch, micro = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) or None
lm = load_model("smollm2-135m-instruct", progress=False)
splits = sd.load_splits(seed=0)
cfg = SRLLMConfig(batch_size=batch, micro_batch_size=micro, eval_every=3)
train = sd.sample_pairs(splits["train"], cfg.train_limit, seed=0)
val = sd.sample_pairs(splits["validation"], 32, seed=0)
t0 = time.perf_counter()
fit = train_lora(lm, train, val, cfg, progress=False, max_steps=steps)
wall = time.perf_counter() - t0
h = hashlib.sha256()
for k, v in sorted(fit.patch.tensors.items()):
    h.update(k.encode()); h.update(v.numpy().tobytes())
if D.rank() == 0:
    print(json.dumps({"train_s": round(wall, 2), "s_per_step": round(wall / steps, 2), "adapter_sha256": h.hexdigest(),
                      "train_loss": fit.history["train_loss"], "val_loss": fit.history["val_loss"],
                      "train_tokens": fit.history["train_tokens"]}), flush=True)
if D.world_size() > 1:
    import torch.distributed as dist
    D.barrier(); dist.destroy_process_group()
"""


def case(procs: int, steps: int, batch: int, micro: int) -> dict:
    env = {**os.environ, "BIASLAB_PROGRESS": "0", "OMP_NUM_THREADS": "2" if procs == 1 else "1"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    args = [f.name, str(steps), str(batch), str(micro)]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if res.returncode:
        raise SystemExit(f"LoRA training with {procs} process(es) failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"processes": procs, "threads_each": 2 if procs == 1 else 1, "micro_batch_size": micro or None,
            "wall_s_with_load": round(time.perf_counter() - t0, 2), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_parallel.json")
    a = ap.parse_args(argv)
    import platform

    import torch

    cases = []
    for procs, micro in ((1, 0), (1, a.micro_batch_size), (2, a.micro_batch_size)):
        r = case(procs, a.steps, a.batch_size, micro)
        print(json.dumps({k: v for k, v in r.items() if k not in ("train_loss", "val_loss")}), flush=True)
        cases.append(r)
    whole, parts1, parts2 = cases
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": "smollm2-135m-instruct (fp32, CPU)", "steps": a.steps, "batch_size": a.batch_size,
        "micro_batch_size": a.micro_batch_size, "cases": cases,
        "parts_over_whole_s_per_step": round(parts1["s_per_step"] / whole["s_per_step"], 3),
        "two_processes_over_one_s_per_step": round(parts2["s_per_step"] / parts1["s_per_step"], 3),
        "identical_adapter_1_vs_2_processes": parts1["adapter_sha256"] == parts2["adapter_sha256"],
        "identical_losses_1_vs_2_processes": (parts1["train_loss"], parts1["val_loss"]) == (parts2["train_loss"],
                                                                                          parts2["val_loss"]),
        "note": "2 CPU cores: one process with 2 threads and two processes with 1 thread each use the same two "
                "cores, so no speed-up is possible here; the ratio shows the cost of the split (a broadcast of the "
                "adapter's gradient per part)",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(a.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "cases")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
