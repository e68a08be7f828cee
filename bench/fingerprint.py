"""The checkpoint fingerprint's first (uncached) hashing, measured (issue 16, "a fingerprint that does not read the
weights twice").

    python bench/fingerprint.py [--files 4] [--mib 512] [--out bench/results/fingerprint.json]

Writes ``--files`` weight shards of ``--mib`` MiB each (random bytes; hashing speed does not depend on content)
and a config.json into a temp directory, then times ``checkpoint_fingerprint`` with no cache:

1. one process, one hashing thread (the code before this change hashed the files one after another);
2. one process, the default threads (``fingerprint._hash_threads``: the CPUs, at most 8, one per file);
3. two gloo processes (``torch.distributed``, one thread each) that each hash every file — what every rank of a
   distributed job did before: the job read each file once per rank;
4. two gloo processes sharing the files out (file *i* on rank *i* mod 2) and gathering the hashes (now).

The files were just written, so they are read from the page cache: this measures hashing, not the disk. On a
real 70 B checkpoint read from disk or a network file system, 3 also multiplies the bytes read by the ranks.
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
import json, os, sys, time
import biaslab.distributed as D
from biaslab.models import fingerprint as FP
threads, mode = int(sys.argv[2]), sys.argv[3]
if threads:
    FP._hash_threads = lambda n: max(1, min(threads, n))
D.init_from_env()
D.barrier()
t = time.perf_counter()
if mode == "every-rank-all":
    with D.local_only():
        fp = FP.checkpoint_fingerprint(sys.argv[1])
else:
    fp = FP.checkpoint_fingerprint(sys.argv[1])
D.barrier()
print(json.dumps({"s": time.perf_counter() - t, "fingerprint": fp, "rank": D.rank()}))
"""


def write_files(d: Path, n: int, mib: int) -> int:
    block = os.urandom(8 << 20)
    for k in range(n):
        with open(d / f"model-{k + 1:05d}-of-{n:05d}.safetensors", "wb") as f:
            for _ in range(mib // 8):
                f.write(block[:-1] + bytes([k]))   # each file differs
    (d / "config.json").write_text('{"model_type": "llama"}')
    return sum(f.stat().st_size for f in d.iterdir())


def case(d: Path, procs: int, threads: int, mode: str) -> dict:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = []
    for r in range(procs):
        env = {**os.environ, "BIASLAB_PROGRESS": "0", "BIASLAB_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
        if procs > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        runs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(threads), mode], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in runs]
    for p, (o, e) in zip(runs, outs):
        if p.returncode:
            raise SystemExit(f"{mode}: a process failed:\n{e[-2000:]}")
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    return {"processes": procs, "threads_each": threads or "default", "mode": mode,
            "wall_s": round(max(r["s"] for r in res), 3), "fingerprints": sorted({r["fingerprint"] for r in res})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fingerprint.json")
    a = ap.parse_args(argv)
    import platform

    from biaslab.models.fingerprint import _hash_threads

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        size = write_files(d, a.files, a.mib)
        cases = [case(d, 1, 1, "one-thread"), case(d, 1, 0, "threads"),
                 case(d, 2, 1, "every-rank-all"), case(d, 2, 1, "sharded")]
    gib = size / 2**30
    for c in cases:
        c["gib_per_s"] = round(gib / c["wall_s"], 2)
        c["gib_read_by_the_job"] = round(gib * (c["processes"] if c["mode"] == "every-rank-all" else 1), 3)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "default_threads": _hash_threads(a.files)},
              "checkpoint": {"files": a.files + 1, "gib": round(gib, 3)}, "cases": cases,
              "same_fingerprint_everywhere": len({f for c in cases for f in c["fingerprints"]}) == 1,
              "note": "files in the page cache (just written): hashing speed, not disk speed"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
