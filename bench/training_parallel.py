"""Training shared across processes (issue 16, "Data parallel"): time and identity, for SR_LLM's LoRA and for a
soft prompt.

    python bench/training_parallel.py --trainer lora [--steps 6] [--batch-size 8] [--micro-batch-size 4]
    python bench/training_parallel.py --trainer softprompt [--train-limit 192] [--batch-size 16] [--micro-batch-size 8]

On the embedded default model, with the method's real data — SR_LLM: the training pairs (``data/debias_rewrites``,
the method's seeded sample), ``--steps`` optimizer steps with validation every 3 steps; soft prompt: one prompt
(seed 0, lr 0.01, 8 virtual tokens) on a seeded ``--train-limit`` sample of SST-5 train, one epoch, validated on
150 dev sentences — in three layouts:

1. one process, 2 threads, no ``--micro-batch-size`` (the default path: each batch in one piece);
2. one process, 2 threads, ``--micro-batch-size`` (the parts one after another);
3. ``torchrun --nproc_per_node=2``, 1 thread each, the same ``--micro-batch-size`` (the parts shared).

It records the training seconds per step of each and whether layouts 2 and 3 trained the same parameters (a
sha256 of the adapter's or prompt's tensors) with the same losses. A 2-core machine cannot show a speed-up from a
second process (both layouts use the same two cores); the ratio is reported anyway.
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

CHILD_HEAD = r"""
import hashlib, json, sys, time
from biaslab import distributed as D
D.init_from_env()
from biaslab.models import load_model
steps, batch, micro = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) or None
lm = load_model("smollm2-135m-instruct", progress=False)
def sha(tensors):
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()
"""

CHILD_LORA = r"""
from biaslab.methods.srllm import data as sd
from biaslab.methods.srllm.config import SRLLMConfig
from biaslab.methods.srllm.training import train_lora
splits = sd.load_splits(seed=0)
cfg = SRLLMConfig(batch_size=batch, micro_batch_size=micro, eval_every=3)
train = sd.sample_pairs(splits["train"], cfg.train_limit, seed=0)
val = sd.sample_pairs(splits["validation"], 32, seed=0)
t0 = time.perf_counter()
fit = train_lora(lm, train, val, cfg, progress=False, max_steps=steps)
wall = time.perf_counter() - t0
out = {"train_s": round(wall, 2), "s_per_step": round(wall / steps, 2), "params_sha256": sha(fit.patch.tensors),
       "train_loss": fit.history["train_loss"], "val_loss": fit.history["val_loss"],
       "train_tokens": fit.history["train_tokens"]}
"""

CHILD_SOFTPROMPT = r"""
from biaslab.probes.prompt_training import train_soft_prompt
from biaslab.probes.softprompt import SoftPromptConfig
from biaslab.probes.sweep import training_data
cfg = SoftPromptConfig(batch_size=batch, train_limit=steps, lr=0.01, seed=0)
train, val = training_data(cfg)
t0 = time.perf_counter()
sp = train_soft_prompt(lm, cfg, train, val, progress=False, micro_batch_size=micro)
wall = time.perf_counter() - t0     # training and the 150-sentence validation
n = len(sp.info["losses"])
out = {"train_s": round(wall, 2), "s_per_step": round(wall / n, 2), "steps": n,
       "params_sha256": sha({"prompt": sp.embeddings}), "train_loss": sp.info["losses"],
       "val_loss": [{"val_accuracy": sp.val_accuracy}]}
"""

CHILD_TAIL = r"""
if D.rank() == 0:
    print(json.dumps(out), flush=True)
if D.world_size() > 1:
    import torch.distributed as dist
    D.barrier(); dist.destroy_process_group()
"""

CHILDREN = {"lora": CHILD_LORA, "softprompt": CHILD_SOFTPROMPT}


def case(trainer: str, procs: int, steps: int, batch: int, micro: int) -> dict:
    env = {**os.environ, "BIASLAB_PROGRESS": "0", "OMP_NUM_THREADS": "2" if procs == 1 else "1"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD_HEAD + CHILDREN[trainer] + CHILD_TAIL)
    args = [f.name, str(steps), str(batch), str(micro)]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if res.returncode:
        raise SystemExit(f"{trainer} training with {procs} process(es) failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"processes": procs, "threads_each": 2 if procs == 1 else 1, "micro_batch_size": micro or None,
            "wall_s_with_load": round(time.perf_counter() - t0, 2), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", choices=sorted(CHILDREN), default="lora")
    ap.add_argument("--steps", type=int, default=6, help="LoRA: optimizer steps")
    ap.add_argument("--train-limit", type=int, default=192, help="soft prompt: training sentences (one epoch)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 (LoRA), 16 (soft prompt)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: half the batch")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/lora_parallel.json or softprompt_parallel.json")
    a = ap.parse_args(argv)
    import platform

    import torch

    batch = a.batch_size or (8 if a.trainer == "lora" else 16)
    micro = a.micro_batch_size or batch // 2
    size = a.steps if a.trainer == "lora" else a.train_limit
    out_file = a.out or ROOT / "bench" / "results" / f"{a.trainer}_parallel.json"
    cases = []
    for procs, m in ((1, 0), (1, micro), (2, micro)):
        r = case(a.trainer, procs, size, batch, m)
        print(json.dumps({k: v for k, v in r.items() if k not in ("train_loss", "val_loss")}), flush=True)
        cases.append(r)
    whole, parts1, parts2 = cases
    what = "adapter" if a.trainer == "lora" else "prompt"
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": "smollm2-135m-instruct (fp32, CPU)", "trainer": a.trainer,
        **({"steps": a.steps} if a.trainer == "lora" else {"train_limit": a.train_limit}),
        "batch_size": batch, "micro_batch_size": micro, "cases": cases,
        "parts_over_whole_s_per_step": round(parts1["s_per_step"] / whole["s_per_step"], 3),
        "two_processes_over_one_s_per_step": round(parts2["s_per_step"] / parts1["s_per_step"], 3),
        f"identical_{what}_1_vs_2_processes": parts1["params_sha256"] == parts2["params_sha256"],
        "identical_losses_1_vs_2_processes": (parts1["train_loss"], parts1["val_loss"]) == (parts2["train_loss"],
                                                                                          parts2["val_loss"]),
        "note": "2 CPU cores: one process with 2 threads and two processes with 1 thread each use the same two "
                f"cores, so no speed-up is possible here; the ratio shows the cost of the split (a broadcast of the "
                f"{what}'s gradient per part)",
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_file)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "cases")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
