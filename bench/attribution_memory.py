"""Peak memory of all-layer activation × gradient with and without activation checkpointing and layer chunking
(``layers_per_pass``: a quarter of the layers per pass) (issue 16, "the GPU path": attribution at 7 B must fit one
GPU). CPU stand-in: a random-weight Llama built by the script (no download),
one attribution pass over every FFN and every linear site, peak RSS measured in a fresh process per setting.

    .venv/bin/python bench/attribution_memory.py --out bench/results/attribution_memory.json

On a GPU the same comparison is `torch.cuda.max_memory_allocated` in bench/gpu_check.py terms; here the numbers are
host RSS above the loaded model (the allocator may keep freed memory, so these are upper bounds)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# the worker's shared part (also bench/attribution_moe.py's): a LanguageModel over ``model`` with a stand-in
# tokenizer, ``batch`` seeded sequences of ``tokens`` tokens, and the RSS / clock before the measured pass
LM_SETUP = r"""
class Tok:
    pad_token_id, eos_token_id, bos_token_id, chat_template = 0, 1, 2, None
from biaslab.models import LanguageModel
from biaslab import attribution as A
lm = LanguageModel(model, Tok(), spec="bench", fingerprint="sha256:bench", progress=False)
seqs = [[2] + [(7 * i + 13 * r) % 4000 + 3 for i in range(int(tokens) - 1)] for r in range(int(batch))]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
"""

WORKER = r"""
import json, resource, sys, time, torch
torch.manual_seed(0)
torch.set_num_threads(2)
from transformers import LlamaConfig, LlamaForCausalLM
layers, hidden, ffn, tokens, batch, kind, ckpt, per_pass = sys.argv[1:9]
heads, dtype = (int(sys.argv[9]), sys.argv[10]) if len(sys.argv) > 10 else (8, "float32")
cfg = LlamaConfig(vocab_size=4096, hidden_size=int(hidden), intermediate_size=int(ffn), num_hidden_layers=int(layers),
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
""" + LM_SETUP + r"""
A.activation_x_gradient(lm, seqs, [5] * len(seqs), sites=kind, token_budget=10**9, checkpoint_layers=ckpt == "1",
                        layers_per_pass=int(per_pass) or None)
print(json.dumps({"base_rss_mb": base / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    chunk = max(1, a.layers // 4)
    # a fixed mmap threshold: glibc then returns every large freed tensor to the OS at once, so the peak RSS tracks
    # the live tensors instead of the heap high-water mark of earlier passes (the default threshold adapts upwards
    # after the first large free, which makes every later pass's tensors stick in the heap)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    settings = [(kind, ckpt, 0) for kind in ("ffn", "linear") for ckpt in (False, True)]
    settings += [("linear", False, chunk), ("linear", True, chunk), ("ffn", True, chunk)]
    for kind, ckpt, per_pass in settings:
        out = subprocess.run([sys.executable, "-c", WORKER, str(a.layers), str(a.hidden), str(a.ffn), str(a.tokens),
                              str(a.batch), kind, "1" if ckpt else "0", str(per_pass)], capture_output=True, text=True,
                             check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(sites=kind, checkpoint_layers=ckpt, layers_per_pass=per_pass or None,
                 attribution_mb=r["peak_rss_mb"] - r["base_rss_mb"])
        rows.append(r)
        print(f"{kind:6s} checkpoint={ckpt!s:5s} layers/pass={per_pass or 'all':>3} attribution "
              f"+{r['attribution_mb']:7.0f} MB peak RSS (model loaded: {r['base_rss_mb']:.0f} MB)  {r['seconds']:.1f} s",
              flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "setting": vars(a) | {"out": str(a.out)}, "rows": rows,
           "note": "host RSS above the loaded model, attribution over batch × tokens (one pass, or one per layer chunk); "
                   "fresh process per row"}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
