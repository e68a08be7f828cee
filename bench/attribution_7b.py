"""Does a 7 B model's all-layer attribution fit one 80 GB GPU? A CPU extrapolation from measured layers (issue 16,
"attribution with activation checkpointing or layer chunking so a 7 B model's all-layer activation × gradient
fits a 80 GB GPU"). Not a GPU measurement: no GPU was available; ``bench/gpu_check.py`` measures the real thing.

    python bench/attribution_7b.py [--layers 2,4] [--tokens 512] [--batch 2] [--out bench/results/attribution_7b.json]

Random-weight Llama models with Llama-2-7B's layer shape (hidden 4,096, FFN 11,008, 32 heads; a 4,096-token
vocabulary so the embeddings stay small), 2 and 4 layers, in float32: bfloat16 matrix products run at a small
fraction of float32's speed on this CPU (minutes per layer), and float32 activations are twice the size of a
bf16 model's, so the float32 memory is an upper bound for bf16. For each setting (FFN sites plain,
checkpointed, checkpointed with one layer per pass; every linear site checkpointed with one layer per pass) one
attribution pass over ``batch`` × ``tokens`` tokens (CRISPR's default token budget is 1,024 per pass) runs in a
fresh process, and its host peak RSS above the loaded model is recorded (``bench/attribution_memory.py``'s worker).
Memory is then fitted as a + b·layers through the two points and read off at 32 layers; the 7 B weights in bf16
(6.74 B parameters, 13.5 GB) are added for the total, giving an upper bound for a bf16 7 B model. The assumption is that per-layer memory is the same on a GPU
(the CUDA caching allocator and kernels' workspaces add to it, typically ~1-2 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_memory import WORKER  # noqa: E402

WEIGHTS_7B_GB = 6.74e9 * 2 / 1e9
SETTINGS = [("ffn", False, 0), ("ffn", True, 0), ("ffn", True, 1), ("linear", True, 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attribution_7b.json")
    a = ap.parse_args(argv)
    layer_counts = [int(x) for x in a.layers.split(",")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}   # see attribution_memory.py
    rows = []
    for kind, ckpt, per_pass in SETTINGS:
        pts = []
        for n in layer_counts:
            out = subprocess.run([sys.executable, "-c", WORKER, str(n), "4096", "11008", str(a.tokens), str(a.batch), kind,
                                  "1" if ckpt else "0", str(per_pass), "32", "float32"], capture_output=True, text=True,
                                 check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            pts.append((n, (r["peak_rss_mb"] - r["base_rss_mb"]) / 1024, r["seconds"]))
            print(f"{kind:6s} checkpoint={ckpt!s:5s} layers/pass={per_pass or 'all':>3} layers={n}: "
                  f"+{pts[-1][1]:.2f} GB, {r['seconds']:.0f} s", flush=True)
        (n0, m0, _), (n1, m1, _) = pts[0], pts[-1]
        slope = (m1 - m0) / (n1 - n0)
        at32 = m0 + slope * (32 - n0)
        rows.append({"sites": kind, "checkpoint_layers": ckpt, "layers_per_pass": per_pass or None,
                     "measured": [{"layers": n, "attribution_gb": round(m, 3), "seconds": round(s, 1)} for n, m, s in pts],
                     "gb_per_layer": round(slope, 3), "attribution_gb_at_32_layers": round(at32, 2),
                     "with_7b_bf16_weights_gb": round(at32 + WEIGHTS_7B_GB, 1),
                     "fits_80gb": at32 + WEIGHTS_7B_GB < 80})
        print(f"  → {slope:.3f} GB / layer; 32 layers: +{at32:.1f} GB, with the weights {at32 + WEIGHTS_7B_GB:.1f} GB",
              flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "kind": "CPU extrapolation, not a GPU measurement",
           "shape": {"hidden": 4096, "ffn": 11008, "heads": 32, "dtype": "float32 (an upper bound for bf16)", "tokens_per_pass": a.tokens * a.batch},
           "weights_7b_bf16_gb": round(WEIGHTS_7B_GB, 1), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
