"""The GPU check (issue 16, "The GPU path, checked"): one short run on a machine with a CUDA GPU.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py --out bench/results/gpu_check.json

On the embedded default model (or a random-weight model of its shape, below), in about 8 minutes or less:

1. **correctness** of every scoring mode in bf16 and fp16 against fp32 padded scoring (the reference): tree
   (packed, tree attention with SDPA chain buckets), tree-flex (the same through flex attention with a block mask,
   ``models/flex.py``), dense (packed, dense-mask rows) and padded, on the same BBQ option-log-likelihood
   requests — same argmax prediction per item (share), max |Δ log-prob|;
2. **throughput**: BBQ items/s and tokens/s of the default audit protocol in bf16, with each tree kernel, the bf16 matmul peak measured
   in the same run (best of large square ``torch.matmul``), and the share of it the scoring achieves
   (forward FLOPs ≈ 2 · non-embedding parameters · real tokens);
3. **memory**: peak GPU memory of the scoring and of a CRISPR attribution pass (all FFN sites), and the
   attribution's time per instance;
4. **a model over two devices** (``gpu_models.split_device_check``): half the layers on the GPU, half on the
   CPU, against the model on the GPU alone — scoring in each mode, the mode the self-check picks, attribution and
   a FAST stamp on a CPU layer (the cross-device paths of ``--device-map``); then ``biaslab env --model``'s
   placement plan against the load it plans (``gpu_models.plan_check``: about half the weights capped onto the GPU,
   the rest on the CPU; bytes per device planned and loaded);
5. **attribution at 7 B** (``bench/gpu_models.py``): a random Llama-2-7B-shaped model built on the GPU in bf16,
   CRISPR's attribution over BBQ instances with each memory switch — peak GPU memory, whether it fits 80 GB, time
   per instance (``--skip-7b`` leaves it out);
6. **a mixture-of-experts model** (``gpu_models.moe_check``): a random Mixtral-shaped model built on the GPU
   (8 layers, hidden 2,048, 8 experts of 4,096 neurons, top-2) — bf16 tree scoring against fp32 padded, biaslab's
   recomputation of the fused experts against the model's own kernel in bf16, and CRISPR's attribution over
   every expert's neurons (time per instance, peak memory, with and without checkpointing);
7. **processes**: where N > 1 GPUs exist, the same audit under ``torchrun --nproc_per_node=1`` and ``=N`` (and,
   with N ≥ 4, under 2 processes each spreading the model over its half of the GPUs with ``--device-map``): wall
   time of each, and whether predictions, log-probs and metric intervals are identical; with one GPU, a CRISPR
   fit in 1 process and in 2 gloo processes sharing it: whether the neurons, results and patch are identical.

On the lent GPU machines (their own image's python3; nothing can be downloaded; 64 MiB travels with the
repository, too little for the default model's GGUF) ``bench/gpu_check.sh`` runs it with ``--random-from
.gpu/smollm2-shape`` — a random-weight model of the default model's shape built there from the config and
tokenizer that ``bench/gpu_prepare.py`` copies (see that file for the device call). Results are saved after every
step. Nothing in the tests or CI runs this; its numbers go in bench/README.md when a GPU machine is available.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dtype, device: str, n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def requests(n_items: int):
    from biaslab.benchmarks import get_benchmark
    b = get_benchmark("bbq", instructions=1)
    items = b.sample(b.load_items(), n_items, 0)
    return b, items


def option_requests(lm, items) -> tuple[list, list[int]]:
    """Every (prompt, option) request of the items under the option log-likelihood protocol, and its item index."""
    from biaslab.tasks import answer_targets, prompt_text

    reqs, owner = [], []
    for k, it in enumerate(items):
        p = prompt_text(lm, it, 0, protocol="option-loglik")
        for t in answer_targets(lm, it, "option-loglik"):
            reqs.append((p, t))
            owner.append(k)
    return reqs, owner


def argmax_per_item(owner: list[int], lps: list[float]) -> list[int]:
    """Per item, the index of its best-scored request (the predicted option)."""
    best = {}
    for j, (k, lp) in enumerate(zip(owner, lps)):
        if k not in best or lp > best[k][0]:
            best[k] = (lp, j)
    return [best[k][1] for k in sorted(best)]


def set_mode(lm, mode: str) -> None:
    """Scoring mode ``tree`` | ``tree-flex`` | ``dense`` | ``padded``, forced (no self-check is reused)."""
    lm.packing = mode != "padded"
    lm.tree_attention = {"tree": True, "tree-flex": True, "dense": False, "padded": None}[mode]
    lm.tree_kernel = "flex" if mode == "tree-flex" else "sdpa"
    lm._mode_checked = {}


def score_mode(lm, reqs, mode: str):
    set_mode(lm, mode)
    return [r.logprob for r in lm.loglikelihood(reqs, desc=mode)]


def processes(model: str, n: int, limit: int) -> dict:
    """The same BBQ audit under ``torchrun --nproc_per_node=1`` and ``=n``, and — with 4 or more GPUs — under 2
    processes that each spread the model over their half of the GPUs (``--device-map balanced``, the per-rank GPU
    blocks of ``distributed.gpu_share``): wall time of each and whether the records (predictions and log-probs)
    and the metric values with their intervals are identical to one process's."""
    import shutil

    layouts = [(1, None), (n, None)] + ([(2, "balanced")] if n >= 4 else [])
    runs = {}
    for k, dm in layouts:
        name = f"{k}" + (f"-{dm}" if dm else "")
        out = Path(f"/tmp/biaslab_gpu_check_audit_{name}")
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}", "-m", "biaslab",
               "audit", "--model", model, "--bench", "bbq", "--limit", str(limit), "-q",
               "--out", str(out), *(["--device-map", dm] if dm else [])]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "BIASLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
        lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()]
        recs = sorted((r for r in lines if "id" in r), key=lambda r: (r["id"], r["instruction"]))  # not the markers
        runs[name] = {"wall_s": round(time.perf_counter() - t, 2), "records": recs,
                      "metrics": json.loads((out / "results.json").read_text())["benchmarks"],
                      "model_devices": json.loads((out / "manifest.json").read_text())["model"].get("device_map")}
    one = runs["1"]

    def versus(other):
        return {"wall_s": other["wall_s"], "ratio_over_1": round(other["wall_s"] / one["wall_s"], 3),
                "same_predictions": [r["pred"] for r in one["records"]] == [r["pred"] for r in other["records"]],
                "max_abs_dlogprob": max((abs(x - y) for r, q in zip(one["records"], other["records"])
                                         for x, y in zip(r.get("logprobs", []), q.get("logprobs", []))), default=0.0),
                "same_metrics_and_intervals": one["metrics"] == other["metrics"],
                "rank0_model_devices": other["model_devices"]}

    return {"n": n, "items": limit, "wall_s_1": one["wall_s"],
            "layouts": {name: versus(r) for name, r in runs.items() if name != "1"}}


def shared_gpu_fit(model: str, small: bool) -> dict:
    """With one GPU: a CRISPR fit (attribution sharded by batch, dev search sharded by chunk) in 1 process and in 2
    gloo processes sharing the GPU (NCCL refuses two ranks on one device). Every attribution contribution and
    record crosses between the ranks as CUDA tensors or their values, so this checks the object collectives and
    the sharding on CUDA: the same neurons, the same results, the same patch tensors."""
    import shutil

    from safetensors.torch import load_file

    size = (["--search-dev-limit", "20", "--dev-size", "8", "--limit", "10"] if small else
            ["--search-dev-limit", "130", "--dev-size", "24", "--limit", "60"])
    runs = {}
    for k in (1, 2):
        out = Path(f"/tmp/biaslab_gpu_check_fit_{k}")
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}", "-m", "biaslab",
               "mitigate", "crispr", "--model", model, "--task", "sst2", "--search", "--search-max",
               "8", "--instructions", "2", "--control-seeds", "1", "--no-retention", "--n-boot", "100", *size,
               "--format", "json", "-q", "--out", str(out)]
        t = time.perf_counter()
        done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                              env={**os.environ, "BIASLAB_PROGRESS": "0", "BIASLAB_DIST_BACKEND": "gloo",
                                   "OMP_NUM_THREADS": "1"})   # CPU reductions split by thread (docs/SCALE.md)
        res = json.loads(done.stdout)
        res.pop("timings_s", None)
        runs[k] = {"wall_s": round(time.perf_counter() - t, 2), "result": res,
                   "patch": load_file(out / "patch.safetensors")}
    a, b = runs[1]["patch"], runs[2]["patch"]
    return {"backend": "gloo, 2 processes on one GPU", "wall_s": {str(k): r["wall_s"] for k, r in runs.items()},
            "same_results": runs[1]["result"] == runs[2]["result"],
            "same_patch": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=300, help="BBQ items for correctness and throughput")
    ap.add_argument("--attr-items", type=int, default=16, help="instances for the attribution memory check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default: the embedded default model)")
    ap.add_argument("--random-from", type=Path, help="build a random-weight model with this directory's config and "
                    "tokenizer (bench/gpu_prepare.py writes .gpu/smollm2-shape) and check with it instead of --model")
    ap.add_argument("--skip-7b", action="store_true", help="leave out the 7 B-shaped attribution memory step")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every step on the CPU with tiny sizes (checks the "
                                                             "script itself where no GPU is available)")
    a = ap.parse_args(argv)
    import torch

    dev = "cpu" if a.cpu_smoke else "cuda"
    if a.cpu_smoke:
        a.items, a.attr_items = min(a.items, 12), min(a.attr_items, 2)
        a.out = a.out.with_name("gpu_check_cpu_smoke.json")
    elif not torch.cuda.is_available():
        print("error: no CUDA device; this check is for a GPU machine (--cpu-smoke checks the script on CPU)",
              file=sys.stderr)
        return 2
    mem = (lambda: torch.cuda.max_memory_allocated() / 2**30) if dev == "cuda" else (lambda: None)
    reset = torch.cuda.reset_peak_memory_stats if dev == "cuda" else (lambda: None)
    from biaslab.models import load_model
    from biaslab.tasks import prompt_text

    import transformers

    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke run: not a GPU measurement)",
           "gpus": torch.cuda.device_count(), "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    try:   # `biaslab env`'s report: GPU properties, free memory, CUDA/NCCL versions, the packages
        from biaslab.machine import machine_report

        res["machine"] = machine_report()
    except Exception as e:  # noqa: BLE001 - the check's numbers matter more than this context
        res["machine"] = {"error": f"{type(e).__name__}: {e}"}
    model = a.model
    if a.random_from:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_models import random_like

        model = str(random_like(a.random_from, Path("/tmp/biaslab_gpu_check_model")))
        res["model"] = {"spec": f"random weights (seed 0) with the config, tokenizer and chat template of "
                                f"{a.random_from}", "path": model,
                        "note": "kernels, memory and speed are the shape's; predictions are a random model's"}
    else:
        res["model"] = {"spec": model}

    t_start = time.perf_counter()

    def save(step: str):   # after every step: a run cut short by its time limit still leaves what it measured,
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)   # and when (to plan the next run's budget)
        res.setdefault("elapsed_after", {})[step] = res["elapsed_s"]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")

    bench, items = requests(a.items)
    ref_lm = load_model(model, device=dev, dtype="float32")
    mc = [it["item"] if "item" in it else it for it in items]
    reqs, owner = option_requests(ref_lm, mc)
    ref = score_mode(ref_lm, reqs, "padded")
    ref_pred = argmax_per_item(owner, ref)
    res["correctness"] = []
    del ref_lm
    for dt in ("bfloat16", "float16"):
        lm = load_model(model, device=dev, dtype=dt)
        for mode in ("tree", "tree-flex", "dense", "padded"):
            t = time.perf_counter()
            try:
                got = score_mode(lm, reqs, mode)
            except Exception as e:   # a mode the model or kernel cannot run is reported, not hidden
                res["correctness"].append({"dtype": dt, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            sync()
            pred = argmax_per_item(owner, got)
            res["correctness"].append({
                "dtype": dt, "mode": mode, "requests": len(reqs), "s": round(time.perf_counter() - t, 2),
                "same_prediction_share": sum(p == q for p, q in zip(pred, ref_pred)) / len(pred),
                "max_abs_dlogprob": max(abs(x - y) for x, y in zip(got, ref))})
        del lm
        if dev == "cuda":
            torch.cuda.empty_cache()

    save("correctness")
    # throughput of the default audit protocol in bf16, with each tree-attention kernel (the first 16 items warm up:
    # flex attention compiles there)
    lm = load_model(model, device=dev, dtype="bfloat16")
    proto = bench.protocol()
    peak = matmul_peak(torch.bfloat16, dev, n=1024 if a.cpu_smoke else 8192, reps=2 if a.cpu_smoke else 10)
    n_nonemb = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n)
    res["throughput"] = []
    # the scoring batch (LanguageModel's token_budget 4096 tokens, max_batch 64 rows) was sized on the CPU: larger
    # batches with the default kernel say whether a GPU wants a larger default
    for kernel, budget, rows in (("sdpa", 4096, 64), ("flex", 4096, 64), ("sdpa", 16384, 256), ("sdpa", 65536, 1024)):
        lm.packing, lm.tree_attention, lm.tree_kernel, lm._mode_checked = None, None, kernel, {}
        lm.token_budget, lm.max_batch = budget, rows
        reset()
        bench.score(lm, items[:16], protocol=proto)
        sync()
        t = time.perf_counter()
        recs = bench.score(lm, items, protocol=proto)
        sync()
        dt_s = time.perf_counter() - t
        toks = sum(len(lm.encode(prompt_text(lm, it, 0, protocol=proto.name))) for it in mc)
        achieved = 2 * n_nonemb * toks / dt_s / 1e12
        res["throughput"].append({
            "protocol": proto.id, "tree_kernel": kernel, "token_budget": budget, "max_batch": rows,
            "items": len(items), "records": len(recs), "s": round(dt_s, 2),
            "items_per_s": round(len(items) / dt_s, 1), "tokens_per_s": round(toks / dt_s, 1),
            "scoring_mode": lm.scoring_mode(), "bf16_matmul_peak_tflops": round(peak, 1),
            "achieved_tflops": round(achieved, 3), "share_of_peak": round(achieved / peak, 4),
            "peak_gpu_mem_gb": mem()})
        save("throughput")
    lm.tree_kernel, lm._mode_checked, lm.token_budget, lm.max_batch = "sdpa", {}, 4096, 64

    # attribution memory and time per instance (all FFN sites, letter protocol)
    from biaslab.methods import METHODS
    from biaslab.methods.crispr.scores import bias_scores

    m = METHODS.get("crispr")()
    cfg = m.make_config({"neurons": 3, "instructions": 1})
    inst = mc[: a.attr_items]
    reset()
    t = time.perf_counter()
    bias_scores(lm, inst, [0], cfg)
    sync()
    res["attribution"] = {"instances": len(inst), "s_per_instance": round((time.perf_counter() - t) / len(inst), 4),
                          "peak_gpu_mem_gb": mem(), "sites": cfg.sites}

    save("attribution")
    # the cross-device paths of a device map: half the layers on the GPU, half on the CPU
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_models import split_device_check

    res["split_device_map"] = split_device_check(model, dev, reqs, owner, inst)
    save("split_device_map")
    from gpu_models import plan_check   # biaslab env's placement plan against the real load it plans

    res["placement_plan"] = plan_check(model, dev)
    save("placement_plan")
    tok_dir = a.random_from or Path(lm.model.name_or_path)
    if not a.skip_7b:   # all-layer attribution at 7 B: does it fit an 80 GB GPU, with which switch
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_models import attribution_7b

        del lm
        if dev == "cuda":
            torch.cuda.empty_cache()
        res["attribution_7b"] = attribution_7b(dev, tok_dir, inst, smoke=a.cpu_smoke)
        save("attribution_7b")
        if dev == "cuda":
            torch.cuda.empty_cache()

    from gpu_models import moe_check   # a mixture-of-experts model: scoring, the experts' recomputation, attribution

    if dev == "cuda":
        torch.cuda.empty_cache()
    try:
        res["moe"] = moe_check(dev, tok_dir, reqs, owner, inst, smoke=a.cpu_smoke)
    except Exception as e:  # noqa: BLE001 - a step that fails is reported, and the later steps still run
        res["moe"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    save("moe")
    if dev == "cuda":
        torch.cuda.empty_cache()
    n = torch.cuda.device_count()
    if n > 1 or a.cpu_smoke:
        res["processes"] = processes(model, 4 if a.cpu_smoke else n, 4 if a.cpu_smoke else a.items)
        save("processes")
    if n == 1 or a.cpu_smoke:
        res["shared_gpu_fit"] = shared_gpu_fit(model, small=a.cpu_smoke)
        save("shared_gpu_fit")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
