"""Data parallelism over processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPU), launched by
``torchrun --nproc_per_node=N -m biaslab …`` or ``accelerate launch -m biaslab …`` (docs/SCALE.md).

The rules every distributed run follows (one place, used by the journaled chunk loop and the runner):

* **Work is split by chunk**: the items are cut into the same chunks as in one process; chunk ``k`` of the chunks
  still to score goes to rank ``k mod world``. A chunk is scored exactly as one process scores it, so the records
  are identical.
* **Rank 0 alone writes**: it owns the run directory (manifest, journal, results, report); after every round the
  ranks' records are gathered to it and journaled in chunk order, so killing any rank loses at most one round, and
  the rerun resumes from the journal.
* **Every rank ends with the same records** (broadcast from rank 0), so the statistics — the bootstrap included —
  are computed on the gathered records exactly as in one process.
* **Collectives time out** (``BIASLAB_DIST_TIMEOUT`` seconds, default 1800): a dead rank is an error, never a hang.
"""
from __future__ import annotations

import contextvars
import os
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta

from . import launchers
from .errors import BiaslabError
from .launchers import timeout_s  # noqa: F401 - BIASLAB_DIST_TIMEOUT, used below and by callers as D.timeout_s

ENV_VARS = launchers.RENDEZVOUS_VARS   # what init_process_group reads (named when it cannot start)


_local = contextvars.ContextVar("biaslab_local_only", default=False)


def _group():
    # torch.distributed not imported yet: no group can exist (and a command that needs no model skips torch)
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _dist():
    """The process group for collectives; None in one process or inside :func:`local_only`."""
    return None if _local.get() else _group()


def rank() -> int:
    """This process's rank (its real rank, also inside :func:`local_only`: only rank 0 ever writes)."""
    d = _group()
    return d.get_rank() if d else 0


def world_size() -> int:
    """The number of processes sharing the work (1 inside :func:`local_only`)."""
    d = _dist()
    return d.get_world_size() if d else 1


@contextmanager
def local_only():
    """Work every rank does whole by itself (a fit): no collectives inside; rank 0 still alone writes."""
    tok = _local.set(True)
    try:
        yield
    finally:
        _local.reset(tok)


def describe() -> dict | None:
    """What the manifest records of a distributed run (None in one process): world size, backend, and the
    launcher's per-node layout where it set one (torchrun / accelerate: ``LOCAL_WORLD_SIZE``,
    ``GROUP_WORLD_SIZE`` = nodes; srun's, adopted, likewise) and ``launcher`` where the ranks came from srun or
    mpirun."""
    d = _group()
    if d is None:
        return None
    out = {"world_size": d.get_world_size(), "backend": str(d.get_backend())}
    if launchers.adopted:
        out["launcher"] = launchers.adopted
    for key, env in (("processes_per_node", "LOCAL_WORLD_SIZE"), ("nodes", "GROUP_WORLD_SIZE")):
        if os.environ.get(env, "").isdigit():
            out[key] = int(os.environ[env])
    return out


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group a launcher described in the environment (``WORLD_SIZE`` > 1, or srun's or MPI's
    variables: :func:`biaslab.launchers.adopt_launcher_env`); False when this is a single process. gloo on CPU,
    NCCL when CUDA is available (``BIASLAB_DIST_BACKEND`` overrides)."""
    launchers.adopt_launcher_env()
    try:
        ws = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BiaslabError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None
    if ws <= 1:
        return False
    import atexit

    import torch
    import torch.distributed as dist

    if _group() is not None:
        return True
    backend = backend or launchers.backend_from_env(torch.cuda.is_available())
    if backend == "nccl":   # a bad share (more ranks on this node than GPUs) is its own clear line
        torch.cuda.set_device(node_share()[0])
    timeout = timedelta(seconds=timeout_s())   # a bad value is its own line, not a failed start of the backend
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    except Exception as e:
        seen = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ENV_VARS)
        origin = f" (copied from {launchers.adopted}'s variables)" if launchers.adopted else ""
        raise BiaslabError(f"torch.distributed could not start the {backend} backend ({type(e).__name__}: "
                           f"{str(e)[:200]}); it read {seen}{origin} — launch with torchrun or accelerate launch"
                           ) from None
    return True


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or timed out (gloo / NCCL report it as RuntimeError)."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "gloo"))


def peer_failure_message(e: BaseException) -> str:
    return (f"another process of this distributed run stopped or timed out ({str(e).splitlines()[0][:160]}); its own "
            f"error is in its log — finished work is kept in the run directory: rerun the same command to resume "
            f"(collectives time out after BIASLAB_DIST_TIMEOUT={timeout_s():g} s)")


ERROR_WAIT_S = 2.0   # how long an erring rank waits to compare its error line with rank 0's


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store() if _group() is not None else None
    except Exception:   # a private accessor: without it every rank prints its own line, as before
        return None


def _poll(done, wait_s: float) -> bool:
    import time

    end = time.monotonic() + wait_s
    while not done():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def post_error(message: str) -> bool:
    """Rank 0 posts its error line; another rank gets True when rank 0 posted the same line, so it need not print
    it (ranks failing one check printed one identical line each). Through the rendezvous store, never a
    collective: the ranks may stand at different points. A rank other than 0 waits up to ``ERROR_WAIT_S`` for rank
    0's line; rank 0 (which always prints) then calls :func:`linger_for_errors`. False in one process or where the
    store cannot answer (then each rank prints its own line)."""
    store = _store()
    if store is None:
        return False
    try:
        if rank() == 0:
            store.set("biaslab/error/0", message)
            return False
        try:
            seen = _poll(lambda: store.check(["biaslab/error/0"]), ERROR_WAIT_S)
            return seen and store.get("biaslab/error/0").decode("utf-8", "replace") == message
        finally:
            store.add("biaslab/errors-read", 1)   # rank 0 may leave now (its store with it)
    except Exception:
        return False


def linger_for_errors() -> None:
    """Rank 0, after printing its error: up to ``ERROR_WAIT_S`` for every other rank to have read its line (the
    store may live in rank 0's process and end with it); ranks that are not failing never read it, so rank 0
    then waits the whole time."""
    store = _store()
    if store is not None and rank() == 0:
        try:
            _poll(lambda: store.add("biaslab/errors-read", 0) >= world_size() - 1, ERROR_WAIT_S)
        except Exception:
            pass


def gpu_share(n_gpus: int, local_rank: int, local_world: int) -> list[int]:
    """The GPUs of a node that belong to one of its ranks: the node's ``n_gpus`` cut into ``local_world`` equal
    blocks of consecutive indices, block ``local_rank`` to that rank (8 GPUs, 2 ranks: 0-3 and 4-7). A remainder
    (7 GPUs, 2 ranks) stays idle, so that every rank holds the same number of devices."""
    if not 0 <= local_rank < local_world:
        raise BiaslabError(f"LOCAL_RANK={local_rank} is outside 0 … LOCAL_WORLD_SIZE-1={local_world - 1}")
    if n_gpus == 0:
        raise BiaslabError("the nccl backend needs GPUs and this node has none (torch sees 0 CUDA devices) — use gloo "
                           "(BIASLAB_DIST_BACKEND=gloo) on CPUs")
    if n_gpus < local_world:
        raise BiaslabError(f"{local_world} processes on this node but only {n_gpus} GPU(s) — start at most one "
                           f"process per GPU (torchrun --nproc_per_node={n_gpus}; under srun --gpus-per-task=1 "
                           f"gives each task its own), or use gloo "
                           f"(BIASLAB_DIST_BACKEND=gloo) on CPUs")
    per = n_gpus // local_world
    return list(range(local_rank * per, (local_rank + 1) * per))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        raise BiaslabError(f"{name} must be an integer, got {os.environ.get(name)!r}") from None


def node_share(n_gpus: int | None = None) -> list[int]:
    """This rank's GPUs (:func:`gpu_share` of ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``, which torchrun and accelerate
    set). Without ``LOCAL_WORLD_SIZE`` every rank gets the one GPU ``LOCAL_RANK``, as before the share existed; an
    srun task bound to its own GPUs gets all it sees (:func:`biaslab.launchers.slurm_bound_gpus`)."""
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    lr = _env_int("LOCAL_RANK", 0)
    if launchers.slurm_bound_gpus() and n_gpus > 0:
        return list(range(n_gpus))
    if "LOCAL_WORLD_SIZE" not in os.environ:
        if lr >= n_gpus:
            raise BiaslabError(f"LOCAL_RANK={lr} but this node has {n_gpus} GPU(s) — start at most one process per GPU")
        return [lr]
    return gpu_share(n_gpus, lr, _env_int("LOCAL_WORLD_SIZE", 1))


def uses_gpu_share() -> bool:
    """True under NCCL: each rank then owns :func:`node_share` (its device, and the devices a device map may use)."""
    d = _group()
    return d is not None and d.get_backend() == "nccl"


def local_device() -> str | None:
    """The device this rank should use: the first GPU of its share under NCCL, else None (the default choice)."""
    return f"cuda:{node_share()[0]}" if uses_gpu_share() else None


def _pack(obj) -> bytes:
    """``obj`` as bytes for an object collective (``torch.save``: tensors anywhere inside keep their device)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    """The object a rank packed, its CUDA tensors on *this* rank's GPU. Plain pickling would rebuild them on the
    sender's device index — another rank's GPU, or one this node does not have; CPU tensors stay on the CPU."""
    import io

    import torch

    dev = local_device()

    def place(storage, location):
        return storage.cuda(torch.device(dev).index) if dev and location.startswith("cuda") else None

    return torch.load(io.BytesIO(data), map_location=place, weights_only=False)   # our own ranks' objects


def broadcast(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a picklable object; its tensors land on each rank's device)."""
    d = _dist()
    if d is None:
        return obj
    box = [_pack(obj) if d.get_rank() == src else None]
    d.broadcast_object_list(box, src=src)
    return obj if d.get_rank() == src else _unpack(box[0])


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (tensors inside land on each rank's device)."""
    d = _dist()
    if d is None:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, _pack(obj))
    return [_unpack(b) for b in out]


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def scatter_rounds(pending: list, world: int) -> list[list]:
    """Round ``r`` gives ``pending[r * world + k]`` to rank ``k`` (None where the round has fewer chunks than ranks:
    those ranks idle for it)."""
    return [[pending[i] if i < len(pending) else None for i in range(r, r + world)]
            for r in range(0, len(pending), world)]


def score_chunks_distributed(run, key: str, items: list, chunk: int, score, *, strip) -> list[dict]:
    """The distributed form of :func:`biaslab.runs.score_journaled` (see the module rules)."""
    from .progress import stage

    n_chunks = (len(items) + chunk - 1) // chunk
    done: dict[int, list[dict]] = {}
    if is_main() and run is not None:
        for no in range(n_chunks):
            recs = run.finished_chunk(key, no)
            if recs is not None:
                done[no] = [strip(r) for r in recs]
    pending = broadcast([no for no in range(n_chunks) if no not in done] if is_main() else None)
    me, W = rank(), world_size()
    with stage(shared_label(key), len(items)) as st:
        if st is not None:
            for no in done:
                st.start_chunk(len(items[no * chunk:(no + 1) * chunk]))
                st.end_chunk(resumed=True)
        for rnd in scatter_rounds(pending, W):
            mine = rnd[me]
            part = items[mine * chunk:(mine + 1) * chunk] if mine is not None else []
            if st is not None:
                st.start_chunk(sum(len(items[c * chunk:(c + 1) * chunk]) for c in rnd if c is not None))
            recs = score(part) if mine is not None else None
            gathered = all_gather((mine, recs))
            if is_main():
                for no, rs in sorted((g for g in gathered if g[0] is not None), key=lambda g: g[0]):
                    if run is not None:
                        run.append_chunk(key, no, rs)
                    done[no] = rs
            if st is not None:
                st.end_chunk()
    records = [r for no in range(n_chunks) for r in done[no]] if is_main() else None
    return broadcast(records)


def shared_label(desc: str) -> str:
    """A progress label for work the ranks share: ``desc (N processes)`` under torch.distributed, else ``desc``."""
    W = world_size()
    return f"{desc} ({W} processes)" if W > 1 else desc


def sharded_map(fn, items: list, chunk: int, *, desc: str | None = None, per_item: int = 1,
                enabled: bool | None = None) -> list:
    """``fn`` over ``items`` in chunks of ``chunk`` (the same chunks in one process and in N), chunk k on rank
    k mod world, the results gathered in chunk order on every rank. For work with no journal (a dev search).
    With ``desc`` the whole map is one progress stage of ``len(items) * per_item`` units (the bars ``fn`` opens
    move it by their share of the round) instead of one bar per chunk."""
    from .progress import stage

    chunks = [items[c:c + chunk] for c in range(0, len(items), chunk)]
    W, me = world_size(), rank()
    done: dict[int, list] = {}
    with stage(shared_label(desc), len(items) * per_item, enabled=enabled) if desc else nullcontext() as st:
        for rnd in scatter_rounds(list(range(len(chunks))), W):
            mine = rnd[me]
            if st is not None:
                st.start_chunk(sum(len(chunks[k]) for k in rnd if k is not None) * per_item)
            out = fn(chunks[mine]) if mine is not None else None
            for k, rs in all_gather((mine, out)):
                if k is not None:
                    done[k] = rs
            if st is not None:
                st.end_chunk()
    return [r for k in range(len(chunks)) for r in done[k]]


def summed_gradients(params: list, n_parts: int, part_loss) -> list:
    """Data-parallel gradients that equal one process's bit for bit: set each of ``params``' ``.grad`` to
    Σ_k ∇ ``part_loss(k)`` over the parts k = 0 … n_parts − 1, on every rank, and return each part's loss value.

    Part k is computed on rank k mod world. Each part's gradient (one flat vector of all ``params``) is broadcast
    from its rank in part order and added left to right, so the sum is the same float sequence in one process (the
    same parts, one after another) and in N. This replaces DistributedDataParallel, whose bucketed all-reduce adds
    in an order that depends on the world size. Memory: two flat copies of the trainable parameters (an adapter or
    a prompt, not the model); traffic: one broadcast of that size per part.

    ``part_loss`` is called once per part on its rank; it must depend only on ``k`` (seed any dropout from ``k``).
    It returns the loss tensor, or ``(loss, info)`` with a dict of floats to report; the result is then each
    part's ``(loss value, info)``."""
    import torch

    W, me, d = world_size(), rank(), _dist()
    if n_parts < 1:
        raise BiaslabError("summed_gradients needs at least one part")
    dtype = params[0].dtype if all(p.dtype == params[0].dtype for p in params) else torch.float32
    # one device for every broadcast: this rank's own GPU under NCCL (the parameters of a model spread by a device
    # map live on several), else the parameters' device
    device = torch.device(local_device()) if d is not None and uses_gpu_share() else params[0].device
    numel = sum(p.numel() for p in params)
    total, mine_losses = None, {}
    for r0 in range(0, n_parts, W):
        k = r0 + me
        flat = None
        if k < n_parts:
            out = part_loss(k)
            loss, info = out if isinstance(out, tuple) else (out, None)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(device=device, dtype=dtype)
                              for g, p in zip(grads, params)])
            mine_losses[k] = float(loss.detach()) if info is None else (float(loss.detach()), info)
        for src in range(min(W, n_parts - r0)):
            if d is None:
                g = flat
            else:
                g = flat if src == me else torch.empty(numel, dtype=dtype, device=device)
                d.broadcast(g, src)
            total = g.clone() if total is None else total.add_(g)
    off = 0
    for p in params:
        p.grad = total[off:off + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype).clone()
        off += p.numel()
    losses: dict[int, float] = {}
    for part in all_gather(mine_losses):
        losses.update(part)
    return [losses[k] for k in range(n_parts)]
