"""What this machine and launch give biaslab (``biaslab env``): each process's rank, device, the dtype ``--dtype
auto`` picks there, its GPUs (under NCCL: its block of the node's, :func:`biaslab.distributed.node_share`) with
their memory, threads, the packages, the cache and its free space, and the launcher variables read. Under torchrun
every rank reports and rank 0 prints them all, so a placement (8 GPUs, 2 ranks → GPUs 0–3 and 4–7) can be checked
before a 70 B job starts. Nothing is loaded and nothing is written."""
from __future__ import annotations

import os
import platform
import shutil
import socket
from importlib import metadata

from . import launchers

_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep   # biaslab's own warnings become notes
PACKAGES = ("biaslab", "torch", "transformers", "accelerate", "peft", "safetensors", "gguf", "kernels")
READ_VARS = tuple(dict.fromkeys((   # the launcher's, NCCL's and biaslab's variables `biaslab env` shows, once each
    *launchers.RENDEZVOUS_VARS, "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "BIASLAB_DIST_BACKEND",
    "BIASLAB_DIST_TIMEOUT", "BIASLAB_TREE_KERNEL", "BIASLAB_CACHE", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE",
    "NCCL_P2P_DISABLE", "NCCL_DEBUG", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SLURM_NNODES",
    *launchers.SLURM_STEP_VARS, *launchers.SLURM_GPU_BIND_VARS)))


def _gpu(index: int) -> dict:
    import torch

    p = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return {"index": index, "name": p.name, "capability": f"{p.major}.{p.minor}", "total_gib": round(total / 2**30, 1),
            "free_gib": round(free / 2**30, 1), "native_bf16": bool(torch.version.hip) or p.major >= 8}


def _cache() -> dict:
    from .models.embedded import cache_dir

    path = cache_dir()
    probe = path
    while not probe.exists() and probe != probe.parent:   # the cache is made on first use: ask its nearest parent
        probe = probe.parent
    out = {"path": str(path), "exists": path.is_dir(), "writable": os.access(probe, os.W_OK)}
    try:
        out["free_gib"] = round(shutil.disk_usage(probe).free / 2**30, 1)
    except OSError:
        pass
    return out


def process_view(device: str | None = None, dtype: str | None = None, *, model: str | None = None, device_map=None,
                 max_memory=None) -> dict:
    """This process's view: what ``--device`` / ``--dtype`` (None: auto) resolve to here, and what it runs with;
    with ``model``, where its weights would go (:func:`biaslab.models.plan.plan_placement`, nothing loaded)."""
    import warnings

    import torch

    from . import distributed as D
    from .models.flex import default_tree_kernel
    from .models.loading import pick_device, pick_dtype

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = D.node_share() if D.uses_gpu_share() else list(range(n_gpus))
    dev = pick_device(device or D.local_device())   # as the runner picks it (under NCCL: this rank's GPU)
    plan = None
    with warnings.catch_warnings(record=True) as caught:   # an old GPU's float16 note is reported, not printed
        warnings.simplefilter("always")
        dt = pick_dtype(dev, dtype)
        if model is not None:
            from .models.plan import plan_placement

            plan = plan_placement(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    view = {"rank": D.rank(), "world_size": D.world_size(), "host": socket.gethostname(),
            "local_rank": D._env_int("LOCAL_RANK", 0),
            "backend": (D.describe() or {}).get("backend"), "device": dev, "dtype": str(dt).replace("torch.", ""),
            "gpus": [_gpu(i) for i in share], "threads": torch.get_num_threads(), "tree_kernel": default_tree_kernel(),
            "notes": sorted({str(w.message) for w in caught if os.path.abspath(w.filename).startswith(_OURS)})}
    if plan is not None:
        view["placement"] = plan
    if torch.cuda.is_available():
        view["cuda"] = torch.version.cuda or torch.version.hip
        if torch.distributed.is_nccl_available():
            view["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return view


def launcher_line(adopted: str | None) -> str:
    """Where this process's rank came from: srun's or mpirun's variables (copied), torch's own, or none."""
    if adopted:
        return f"{adopted} (its ranks copied into torch's variables)"
    return "torchrun / accelerate (torch's variables)" if "WORLD_SIZE" in os.environ else "none: one process"


def machine_report(device: str | None = None, dtype: str | None = None, **placement) -> dict:
    """Every rank's :func:`process_view` (in rank order), with what is the same for all of them: packages, Python,
    platform, the cache, and the launcher variables as rank 0 read them."""
    from . import distributed as D

    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": pkgs,
            "hub_kernels": "off (every load passes use_kernels=False)", "cache": _cache(),
            "environment": {k: os.environ[k] for k in READ_VARS if k in os.environ},
            "launcher": launcher_line(launchers.adopted),
            "processes": D.all_gather(process_view(device, dtype, **placement))}


def render_text(report: dict) -> str:
    """The report as plain lines: the shared facts, then one line per rank."""
    pk = ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v)
    c = report["cache"]
    lines = [f"python {report['python']} on {report['platform']}", f"packages: {pk}",
             f"hub kernels: {report['hub_kernels']}", f"launcher: {report['launcher']}",
             f"cache: {c['path']} ({'exists' if c['exists'] else 'made on first use'}, "
             f"{'writable' if c['writable'] else 'NOT writable: set BIASLAB_CACHE'}"
             + (f", {c['free_gib']} GiB free" if "free_gib" in c else "") + ")",
             "environment: " + (", ".join(f"{k}={v}" for k, v in report["environment"].items()) or "(none of "
                                "the launcher's variables: one process)")]
    for p in report["processes"]:
        gpus = "; ".join(f"{g['index']}: {g['name']} {g['free_gib']} of {g['total_gib']} GiB free"
                         + ("" if g["native_bf16"] else ", no native bf16") for g in p["gpus"]) or "none"
        lines.append(f"rank {p['rank']}/{p['world_size']} on {p['host']} (local rank {p['local_rank']}"
                     + (f", {p['backend']}" if p["backend"] else "") + f"): device {p['device']}, dtype {p['dtype']}, "
                     f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}, tree kernel {p['tree_kernel']}; GPUs {gpus}"
                     + (f"; CUDA {p['cuda']}" if p.get("cuda") else "") + (f", NCCL {p['nccl']}" if p.get("nccl") else ""))
        lines += [f"  note: {n}" for n in p["notes"]]
        if "placement" in p:
            from .models.plan import render_plan

            lines.append("  " + render_plan(p["placement"]))
    return "\n".join(lines) + "\n"
