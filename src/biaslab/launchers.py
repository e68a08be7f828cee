"""Launchers that start several processes without torch's variables: ``mpirun`` (how ``accelerate launch`` starts
several CPU processes) and Slurm's ``srun`` (one task per GPU, ``srun --ntasks-per-node=8 biaslab …``). Their
rank variables are copied into torch's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` before the process group starts, only when no launcher set ``WORLD_SIZE``
(torchrun and accelerate's own launcher always win). docs/SCALE.md, "Several nodes". Also the two biaslab variables
the process group reads, checked: ``BIASLAB_DIST_BACKEND`` and ``BIASLAB_DIST_TIMEOUT``."""
from __future__ import annotations

import os
import re

from .errors import BiaslabError

MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SLURM_STEP_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NODELIST",
                   "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID")
SLURM_GPU_BIND_VARS = ("SLURM_TRES_BIND", "SLURM_GPU_BIND", "SLURM_GPUS_PER_TASK")   # read by slurm_bound_gpus
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCH_VARS = (*RENDEZVOUS_VARS, "GROUP_WORLD_SIZE")   # what an adoption writes (and undo_adoption restores)

adopted: str | None = None   # "slurm" / "mpi" once this process took its ranks from that launcher
_before: dict[str, str | None] = {}   # torch's variables as they were before an adoption wrote them


BACKENDS = ("gloo", "nccl", "mpi")   # torch.distributed's own (mpi: a torch built with MPI)


def backend_from_env(cuda: bool) -> str:
    """``BIASLAB_DIST_BACKEND``, checked; else nccl with CUDA, gloo without."""
    backend = os.environ.get("BIASLAB_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if backend not in BACKENDS:
        raise BiaslabError(f"BIASLAB_DIST_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)} (gloo on CPUs, "
                           "nccl on GPUs)")
    return backend


def timeout_s() -> float:
    """``BIASLAB_DIST_TIMEOUT`` (seconds, default 1800), checked."""
    raw = os.environ.get("BIASLAB_DIST_TIMEOUT", "1800")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BiaslabError(f"BIASLAB_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else None


def _set(values: dict) -> None:
    for name, value in values.items():
        os.environ[name] = str(value)


def undo_adoption() -> None:
    """Put torch's variables back as they were before :func:`adopt_launcher_env` (the process then runs alone)."""
    global adopted
    for name, value in _before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _before.clear()
    adopted = None


def adopt_launcher_env() -> str | None:
    """Adopt Slurm's or MPI's ranks (see the module docstring); the launcher adopted, or None."""
    global adopted
    if "WORLD_SIZE" in os.environ:
        return None
    before = {v: os.environ.get(v) for v in TORCH_VARS}
    for name, adopt in (("slurm", adopt_slurm_env), ("mpi", adopt_mpi_env)):
        if adopt():
            adopted = name
            _before.update(before)
            return name
    return None


def adopt_mpi_env() -> bool:
    """Processes started by ``mpirun`` carry MPI's rank variables (read with Accelerate's own reader).
    ``MASTER_ADDR`` defaults to 127.0.0.1 on one node (accelerate's launcher sets it), ``MASTER_PORT`` to 29500.
    True when it adopted them."""
    if "WORLD_SIZE" in os.environ or not any((_int(v) or 0) > 1 for v in MPI_SIZE_VARS):
        return False
    from accelerate.utils.environment import get_cpu_distributed_information

    info = get_cpu_distributed_information()
    if "MASTER_ADDR" not in os.environ:
        if info.local_world_size < info.world_size:
            raise BiaslabError(f"{info.world_size} MPI processes, {info.local_world_size} of them known to be on this "
                               f"node, and no MASTER_ADDR — export rank 0's host name as MASTER_ADDR (and a free "
                               f"MASTER_PORT) for every process")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29500")
    _set({"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
          "LOCAL_WORLD_SIZE": info.local_world_size})
    return True


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks-per-node list, ``"2(x3),1"`` → ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(part)
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (``"gpu[07-09,12],cpu1"`` → ``"gpu07"``: each bracket's first number,
    its zero padding kept), as ``scontrol show hostnames`` would list it first."""
    host, i = "", 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.index("]", i)
            host += re.split(r"[,-]", nodelist[i + 1:end])[0]
            i = end + 1
        else:
            host += nodelist[i]
            i += 1
    if not host.strip():
        raise ValueError(nodelist)
    return host.strip()


def job_port(job_id: int | None) -> int:
    """The rendezvous port of a Slurm job's tasks when none is set: 20000 + the job id's last four digits (the same
    for every task of the job, rarely the same for two jobs sharing a node); 29500 without a job id."""
    return 29500 if job_id is None else 20000 + job_id % 10000


def adopt_slurm_env() -> bool:
    """Tasks started by ``srun`` (``SLURM_STEP_NUM_TASKS`` > 1; a batch script's own shell has no ``SLURM_STEP_*``
    variables and stays one process): rank ``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, local rank
    ``SLURM_LOCALID`` of this node's count in ``SLURM_STEP_TASKS_PER_NODE`` (its ``SLURM_NODEID``-th entry where the
    counts differ). ``MASTER_ADDR``: 127.0.0.1 on one node, else the step's first host (where srun's default block
    distribution puts task 0); ``MASTER_PORT``: :func:`job_port`. Not taken when MPI's variables describe other
    ranks (``mpirun`` inside an allocation starts its daemons with srun, whose Slurm variables then count daemons,
    not ranks). True when it adopted them."""
    n = _int("SLURM_STEP_NUM_TASKS")
    if "WORLD_SIZE" in os.environ or n is None or n <= 1:
        return False
    mpi_size = next((_int(v) for v in MPI_SIZE_VARS if _int(v) is not None), None)
    mpi_rank = next((_int(v) for v in MPI_RANK_VARS if _int(v) is not None), None)
    if mpi_size is not None and (mpi_size != n or mpi_rank != _int("SLURM_PROCID")):
        return False
    seen = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in SLURM_STEP_VARS)
    bad = f"srun started {n} tasks but its variables do not describe this one ({seen}) — start biaslab under torchrun"
    rank, local, node = _int("SLURM_PROCID"), _int("SLURM_LOCALID"), _int("SLURM_NODEID") or 0
    try:
        per_node = tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    except ValueError:
        raise BiaslabError(bad) from None
    if len(set(per_node)) == 1:   # the same count on every node: no need to know which node this is
        node = 0
    if rank is None or local is None or sum(per_node) != n or not rank < n or node >= len(per_node) \
            or not local < per_node[node]:
        raise BiaslabError(bad)
    if "MASTER_ADDR" not in os.environ:
        try:
            os.environ["MASTER_ADDR"] = "127.0.0.1" if len(per_node) == 1 else \
                first_host(os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", ""))
        except ValueError:
            raise BiaslabError(f"srun started {n} tasks on {len(per_node)} nodes and SLURM_STEP_NODELIST names no "
                               f"host — export rank 0's host name as MASTER_ADDR for every task") from None
    os.environ.setdefault("MASTER_PORT", str(job_port(_int("SLURM_JOB_ID"))))
    _set({"RANK": rank, "WORLD_SIZE": n, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": per_node[node],
          "GROUP_WORLD_SIZE": len(per_node)})
    return True


def slurm_bound_gpus() -> bool:
    """True when srun bound each task to its own GPUs, so a task uses every GPU it sees instead of a block of the
    node's: a GPU binding in ``SLURM_TRES_BIND`` (srun sets ``gres/gpu:per_task:N`` for ``--gpus-per-task=N``, or
    the ``--gpu-bind`` given), ``SLURM_GPU_BIND``, or ``SLURM_GPUS_PER_TASK`` (older Slurm); a binding of ``none``
    does not count. Unbound tasks that see fewer GPUs than there are tasks on their node are refused
    (:func:`biaslab.distributed.gpu_share`) rather than guessed bound: they would share GPUs."""
    if adopted != "slurm":
        return False
    binds = [p.split(":", 1)[1] for p in os.environ.get("SLURM_TRES_BIND", "").split("+") if p.startswith("gres/gpu:")]
    binds += [os.environ["SLURM_GPU_BIND"]] if os.environ.get("SLURM_GPU_BIND") else []
    return any("none" not in re.split(r"[,:]", b) for b in binds) or bool(os.environ.get("SLURM_GPUS_PER_TASK"))
