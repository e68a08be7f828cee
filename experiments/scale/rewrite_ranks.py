"""``biaslab rewrite`` shared by two ranks writes the file one process writes (issue 16): the 100 biased sentences
of the vendored WNC test sample (``data/debias_rewrites/wnc_pryzant_sample/pre.test.txt``) rewritten by the
default model (no patch: the prompt alone), in three layouts — one process (the cores' threads), one process with
one thread, and ``torchrun --nproc_per_node=2`` (gloo; one thread per rank; chunks of 64 texts, so rank 0 takes
64 and rank 1 36). Each output is compared with the two-process one, text by text.

    .venv/bin/python experiments/scale/rewrite_ranks.py [--work DIR]

Writes experiments/scale/rewrite_ranks.json. About 5 minutes on the 2-core machine.
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

HERE = Path(__file__).resolve().parent
TEXTS = HERE.parents[1] / "src" / "biaslab" / "data" / "debias_rewrites" / "wnc_pryzant_sample" / "pre.test.txt"
LAYOUTS = {"1 process": (1, None), "1 process, 1 thread": (1, "1"), "2 processes": (2, None)}


def run(out: Path, nproc: int, threads: str | None, max_new: int) -> float:
    env = {**os.environ, "BIASLAB_PROGRESS": "0", **({"OMP_NUM_THREADS": threads} if threads else {})}
    head = ([sys.executable, "-m", "biaslab"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "biaslab"])
    t0 = time.time()
    p = subprocess.run([*head, "rewrite", "--input", str(TEXTS), "--max-new-tokens", str(max_new), "--output", str(out)],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"rewrite ({nproc} processes) failed:\n{p.stderr[-3000:]}")
    return round(time.time() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="where the outputs go (default: a new temporary dir)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="rewrite-ranks-"))
    work.mkdir(parents=True, exist_ok=True)
    outs, wall = {}, {}
    for name, (nproc, threads) in LAYOUTS.items():
        path = work / (name.replace(" ", "_").replace(",", "") + ".jsonl")
        if path.exists():
            sys.exit(f"{path} exists: pass a new --work directory")
        wall[name] = run(path, nproc, threads, a.max_new_tokens)
        outs[name] = [json.loads(line) for line in path.read_text().splitlines()]
        print(f"{name}: {len(outs[name])} rewrites in {wall[name]} s", flush=True)
    two = outs["2 processes"]
    result = {"texts": len(two), "max_new_tokens": a.max_new_tokens, "model": "smollm2-135m-instruct",
              "wall_s": wall, "vs_2_processes": {}}
    for name in ("1 process, 1 thread", "1 process"):
        same = sum(x == y for x, y in zip(outs[name], two))
        differ = [i + 1 for i, (x, y) in enumerate(zip(outs[name], two)) if x != y]
        result["vs_2_processes"][name] = {"identical_rewrites": same, "texts_that_differ": differ,
                                          "same_order_of_inputs": [x["input"] for x in outs[name]] == [y["input"] for y in two]}
    result["example"] = two[0]
    (HERE / "rewrite_ranks.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "example"}, indent=1))


if __name__ == "__main__":
    main()
