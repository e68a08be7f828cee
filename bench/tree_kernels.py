"""Tree attention's two kernels side by side (issue 16, "the GPU path"): SDPA over chain buckets (the default) and
flex attention with a block mask (``models/flex.py``), against padded scoring, on the embedded default model.

    python bench/tree_kernels.py [--items 40] [--device cpu|cuda] [--dtype float32] [--compile] [--out FILE]

BBQ option log-likelihood requests of ``--items`` items (the first ``--items // 4`` warm up: on CUDA flex attention
compiles there), scored in each mode: seconds, requests/s, max |Δ log-prob| against padded scoring and the share of
items whose argmax option agrees with it. On CPU flex attention runs unfused (each layer's full N × N scores), so
it is expected to lose there; the GPU numbers come from ``bench/gpu_check.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="compile flex attention on this device too "
                                                           "(BIASLAB_FLEX_COMPILE=1; on CUDA it always is)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/tree_kernels_<device>[_compiled].json")
    a = ap.parse_args(argv)
    if a.compile:
        os.environ["BIASLAB_FLEX_COMPILE"] = "1"
    a.out = a.out or ROOT / "bench" / "results" / f"tree_kernels_{a.device.split(':')[0]}{'_compiled' if a.compile else ''}.json"
    import torch

    from biaslab.benchmarks import get_benchmark
    from biaslab.models import load_model
    from biaslab.models.flex import compile_flex
    from gpu_check import argmax_per_item, option_requests, set_mode

    torch.set_num_threads(2)
    b = get_benchmark("bbq", instructions=1)
    items = [it["item"] if "item" in it else it for it in b.sample(b.load_items(), a.items, 0)]
    lm = load_model("smollm2-135m-instruct", device=a.device, dtype=a.dtype, progress=False)
    reqs, owner = option_requests(lm, items)
    warm = sum(1 for k in owner if k < max(1, a.items // 4))

    def run(mode):
        set_mode(lm, mode)
        lm.loglikelihood(reqs[:warm], desc=mode)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        got = [r.logprob for r in lm.loglikelihood(reqs, desc=mode)]
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return got, time.perf_counter() - t

    ref, ref_s = run("padded")
    rows = [{"mode": "padded", "s": round(ref_s, 2), "requests_per_s": round(len(reqs) / ref_s, 1)}]
    for mode in ("tree", "tree-flex"):
        got, s = run(mode)
        rows.append({"mode": mode, "s": round(s, 2), "requests_per_s": round(len(reqs) / s, 1),
                     "max_abs_dlogprob_vs_padded": max(abs(x - y) for x, y in zip(got, ref)),
                     "same_prediction_share": sum(p == q for p, q in zip(argmax_per_item(owner, got), argmax_per_item(owner, ref))) / len(items)})
        print(rows[-1], flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "device": a.device, "dtype": a.dtype, "items": a.items,
           "flex_compiled": compile_flex(a.device.split(":")[0]),
           "requests": len(reqs), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "torch": torch.__version__}, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
