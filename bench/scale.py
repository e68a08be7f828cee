"""Loading at size and data parallelism on this machine (issue 16, "Bench").

    python bench/scale.py [--params-b 1.1] [--out bench/results/scale.json] [--keep DIR]

In one run:

1. writes a random-weight Llama checkpoint of about ``--params-b`` billion parameters to disk in bf16
   safetensors (no download; TinyLlama-1.1B's shape by default), then loads it with ``biaslab.load_model`` in
   a fresh process for each case — bf16 and float32 — recording wall time, peak host RSS (``ru_maxrss``) and the
   checkpoint's size. A bf16 load whose peak RSS stays near the checkpoint size shows no float32 copy was made
   (a float32 copy alone would be 2 × the bf16 checkpoint);
2. the checkpoint fingerprint: the first load hashes the files (streamed), the second reads the cached hash;
3. audit throughput on the embedded default model (CrowS-Pairs, ``--audit-limit`` pairs): one process with 2
   threads vs ``torchrun --nproc_per_node=2`` with 1 thread each. A 2-core machine cannot show a speed-up from a
   second process (both layouts use the same two cores); the ratio is reported anyway, with the check that both
   runs produced identical results.
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

LOAD_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from biaslab.models import load_model
t1 = time.perf_counter()
lm = load_model(sys.argv[1], dtype=sys.argv[2], progress=False)
t2 = time.perf_counter()
n = sum(p.numel() for p in lm.model.parameters())
print(json.dumps({"dtype": sys.argv[2], "import_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  "params": n, "model_dtype": str(lm.dtype), "fingerprint": lm.fingerprint,
                  "fingerprint_kind": lm.fingerprint_kind}))
"""


def write_checkpoint(path: Path, params_b: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B's shape; depth scaled to the requested size
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632   # q, o; k, v (4 of 32 heads); gated MLP
    emb = 2 * 32000 * 2048
    layers = max(1, round((params_b * 1e9 - emb) / per_layer))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    from biaslab.models.loading import embedded_model_dir

    AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m-instruct")).save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"layers": layers, "params": n, "checkpoint_gb": round(size / 2**30, 3),
            "write_s": round(time.perf_counter() - t0, 1)}


def load_case(path: Path, dtype: str, cache: Path) -> dict:
    env = {**os.environ, "BIASLAB_CACHE": str(cache), "BIASLAB_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path), dtype], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def audit_case(procs: int, limit: int, out: Path) -> dict:
    env = {**os.environ, "BIASLAB_PROGRESS": "0"}
    base = ["audit", "--bench", "crows", "--limit", str(limit), "--n-boot", "200", "--format", "json", "-q",
            "--out", str(out)]
    if procs == 1:
        cmd = [sys.executable, "-m", "biaslab", *base]
        env["OMP_NUM_THREADS"] = "2"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
               "biaslab", *base]
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"audit with {procs} process(es) failed:\n{res.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    scored = manifest["timings_s"]["crows"]
    return {"processes": procs, "threads_each": 2 if procs == 1 else 1, "wall_s": round(wall, 2),
            "scoring_s": scored, "items_per_s": round(limit / scored, 2),
            "benchmarks": json.loads(res.stdout)["benchmarks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params-b", type=float, default=1.1)
    ap.add_argument("--audit-limit", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)")
    a = ap.parse_args(argv)
    import platform

    import torch

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(dir=a.keep.parent if a.keep else None) as tmp:
        ck = a.keep or Path(tmp) / "ckpt"
        cache = Path(tmp) / "cache"
        print(f"writing a random ~{a.params_b} B-parameter checkpoint to {ck} …", flush=True)
        result["checkpoint"] = write_checkpoint(ck, a.params_b)
        print(json.dumps(result["checkpoint"]), flush=True)
        cases = []
        for dtype in ("bfloat16", "float32", "bfloat16"):   # the second bf16 load reads the cached fingerprint
            r = load_case(ck, dtype, cache)
            cases.append(r)
            print(json.dumps(r), flush=True)
        gb = result["checkpoint"]["checkpoint_gb"]
        result["loading"] = {
            "cases": cases,
            "bf16_peak_rss_over_checkpoint": round(cases[0]["peak_rss_gb"] / gb, 2),
            "fp32_peak_rss_over_checkpoint": round(cases[1]["peak_rss_gb"] / gb, 2),
            "first_load_s_with_hashing": cases[0]["load_s"], "cached_fingerprint_load_s": cases[2]["load_s"],
            "same_fingerprint_across_dtypes": len({c["fingerprint"] for c in cases}) == 1,
        }
        one = audit_case(1, a.audit_limit, Path(tmp) / "audit1")
        two = audit_case(2, a.audit_limit, Path(tmp) / "audit2")
        result["audit"] = {
            "benchmark": "crows", "items": a.audit_limit, "one_process": {k: v for k, v in one.items() if k != "benchmarks"},
            "two_processes": {k: v for k, v in two.items() if k != "benchmarks"},
            "two_over_one_items_per_s": round(two["items_per_s"] / one["items_per_s"], 3),
            "identical_results": one["benchmarks"] == two["benchmarks"],
            "note": "2 CPU cores: one process with 2 threads and two processes with 1 thread each use the same two "
                    "cores, so no speed-up is possible here; the ratio shows the cost of the process split",
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
