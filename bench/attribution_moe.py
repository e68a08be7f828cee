"""What CRISPR's attribution costs on a mixture-of-experts model (docs/methods/crispr.md, "Mixture-of-experts
models"): time and peak host memory of one all-layer activation × gradient pass on a random-weight Mixtral-shaped
model (no download), against a dense Llama of the same shape whose FFN is as wide as the experts a token visits
(k·I: the same FFN compute per token), and against the MoE model's own forward and backward without biaslab's
recomputation. Each setting runs in a fresh process; peak RSS above the loaded model, so upper bounds.

    .venv/bin/python bench/attribution_moe.py --out bench/results/attribution_moe.json

A MoE layer's site holds (tokens, E·I) activations, E times those of a dense FFN of width I, and its output is
biaslab's recomputation (a loop over the experts) that attribution differentiates."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from attribution_memory import LM_SETUP  # noqa: E402 - bench/ is the script's directory, on sys.path

WORKER = r"""
import json, resource, sys, time, torch
torch.manual_seed(0)
torch.set_num_threads(2)
import transformers as T
arch, layers, hidden, ffn, experts, top_k, tokens, batch, mode, per_pass = sys.argv[1:11]
common = dict(vocab_size=4096, hidden_size=int(hidden), num_hidden_layers=int(layers), num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=4096)
if arch == "moe":
    cfg = T.MixtralConfig(**common, intermediate_size=int(ffn), num_local_experts=int(experts),
                          num_experts_per_tok=int(top_k))
else:
    cfg = T.LlamaConfig(**common, intermediate_size=int(ffn) * int(top_k))
model = T.AutoModelForCausalLM.from_config(cfg).eval()
""" + LM_SETUP + r"""
if mode == "model":   # the model's own forward + backward to the input embeddings, no site hooked
    ids = torch.tensor(seqs)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(inputs_embeds=emb).logits[:, -1].log_softmax(-1)[:, 5].sum()
        torch.autograd.grad(out, [emb])
else:
    A.activation_x_gradient(lm, seqs, [5] * len(seqs), sites="ffn", token_budget=10**9,
                            checkpoint_layers=mode == "ckpt", layers_per_pass=int(per_pass) or None)
print(json.dumps({"base_rss_mb": base / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=704, help="neurons per expert (I)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "BIASLAB_PROGRESS": "0"}   # see attribution_memory.py
    settings = [("moe", "model", 0), ("moe", "plain", 0), ("moe", "ckpt", 0), ("moe", "plain", max(1, a.layers // 4)),
                ("dense", "model", 0), ("dense", "plain", 0)]
    rows = []
    for arch, mode, per_pass in settings:
        args = [arch, a.layers, a.hidden, a.ffn, a.experts, a.top_k, a.tokens, a.batch, mode, per_pass]
        r = subprocess.run([sys.executable, "-c", WORKER, *map(str, args)], capture_output=True, text=True, env=env)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        row = {"arch": arch, "mode": mode, "layers_per_pass": per_pass or None,
               "peak_above_model_mb": round(m["peak_rss_mb"] - m["base_rss_mb"], 1), "seconds": round(m["seconds"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shape = {k: getattr(a, k) for k in ("layers", "hidden", "ffn", "experts", "top_k", "tokens", "batch")}
    out = {"shape": shape, "rows": rows,
           "site_units_per_token_per_layer": {"moe": a.experts * a.ffn, "dense": a.top_k * a.ffn}}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
