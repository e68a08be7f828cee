"""The identity of a base model (patches check it before they apply): a sha256 over the checkpoint files for a
model loaded from disk (:func:`checkpoint_fingerprint`), or over the weights for a model built in memory
(:func:`weights_fingerprint`)."""
from __future__ import annotations

import hashlib


def weights_fingerprint(model) -> str:
    """sha256 over parameter names, shapes and float32 bytes, in name order: the identity of a base model.

    Computed on the weights as loaded (before any patch), so a patch can check it was made for this base.
    """
    import torch

    h = hashlib.sha256()
    state = model.state_dict()
    seen = set()
    for name in sorted(state):
        t = state[name]
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights: hash once
            h.update(f"{name}=tied".encode())
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


CHUNK = 8 << 20


WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"))


def _indexed_shards(index) -> list:
    """The shard files a ``*.index.json`` maps the weights to, in name order (what transformers loads)."""
    import json

    from ..errors import BiaslabError

    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BiaslabError(f"{index}: not a weights index (expected a JSON object whose 'weight_map' maps tensor "
                           "names to shard files); restore it from the checkpoint's source") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing or not names:
        raise BiaslabError(f"{index} names the shard {missing[0] if missing else '(none)'}, which is not in "
                           f"{index.parent}: the checkpoint is incomplete — download or copy the missing shards")
    return [index.parent / n for n in names]


def checkpoint_files(path) -> list:
    """The files that define a checkpoint — the weights transformers loads, then config.json: the shards a
    ``model.safetensors.index.json`` names, else ``model.safetensors``, else every ``*.safetensors``; the same for
    PyTorch ``.bin``; else one ``.gguf``. Other files (a ``consolidated.safetensors`` beside the shards, as
    Mistral's repositories ship) are not part of it, so deleting one leaves the fingerprint as it was."""
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return [p]
    weights = []
    for index, single, pattern in WEIGHT_LAYOUTS:
        if (p / index).is_file():
            weights = _indexed_shards(p / index)
        elif (p / single).is_file():
            weights = [p / single]
        else:
            weights = sorted(p.glob(pattern))
        if weights:
            break
    weights = weights or sorted(p.glob("*.gguf"))
    cfg = p / "config.json"
    return weights + ([cfg] if cfg.is_file() else [])


def _read_cache(cache_file) -> dict:
    import json
    from pathlib import Path

    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        cache = json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache_file, cache: dict) -> None:
    """Atomically (the model cache's own writer); a read-only cache only costs a re-hash next time."""
    from pathlib import Path

    from .embedded import _write_json

    cf = Path(cache_file)
    try:
        cf.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    _write_json(cf, cache)


def _hash_threads(n_files: int) -> int:
    """Threads for hashing (hashlib releases the GIL on large blocks): the CPUs this process may use, shared with
    the other processes of the node, at most 8 and at most one per file."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, min(8, n_files, cpus // max(1, int(per_node) if per_node.isdigit() else 1)))


def _hash_files(files: list, progress: bool) -> list[str]:
    """The streamed sha256 of each file, several files at a time, with a progress bar (MiB, ETA) over them."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ..progress import progress_bar

    total = sum(f.stat().st_size for f in files)
    lock = threading.Lock()
    with progress_bar(total >> 20, f"hashing {len(files)} checkpoint file(s) for the fingerprint", unit="MiB",
                      enabled=None if progress and total >= 1 << 30 else False) as advance:
        def one(f) -> str:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while True:
                    b = fh.read(CHUNK)
                    if not b:
                        break
                    h.update(b)
                    with lock:
                        advance(len(b) / (1 << 20))
            return h.hexdigest()

        with ThreadPoolExecutor(_hash_threads(len(files))) as pool:
            return list(pool.map(one, files))


SAMPLE = 1 << 20


def copy_signature(files: list) -> list[tuple[str, int, str]]:
    """Each file's name, size and the sha256 of its first and last MiB: what every rank reads to check that the
    ranks' copies of a checkpoint are the same (node-local copies on several machines), since each file's full hash
    is computed by one rank only. A sample, not a proof: two copies differing only inside a file's middle pass."""
    out = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE))
            if size > 2 * SAMPLE:
                fh.seek(size - SAMPLE)
            h.update(fh.read(SAMPLE))
        out.append((f.name, size, h.hexdigest()))
    return out


def _copies_differ(path, rank: int, hosts: list[str], ref: list, got: list) -> str:
    """One line: which rank's copy of the checkpoint differs from rank 0's, and in which file."""
    a, b = {n: (s, h) for n, s, h in ref}, {n: (s, h) for n, s, h in got}
    name = next((n for n in sorted(a.keys() | b.keys()) if a.get(n) != b.get(n)), "?")
    what = ("is missing there" if name not in b else "is not in rank 0's copy" if name not in a else
            f"has {b[name][0]:,} bytes there, {a[name][0]:,} on rank 0" if a[name][0] != b[name][0] else
            "has other bytes there (its first or last MiB)")
    return (f"rank {rank} (on {hosts[rank]}) reads another copy of the checkpoint {path} than rank 0 (on {hosts[0]}): "
            f"{name} {what} — give every node the same files, or put the model on a file system they share")


def checkpoint_fingerprint(path, cache_file=None, *, progress: bool = False) -> str:
    """The identity of a checkpoint on disk, from its files, never from the loaded weights: sha256 over each file's
    name and streamed sha256, so it is the same whatever dtype or device map the model is loaded with. Each file's
    hash is cached in ``cache_file`` by absolute path, size and mtime: a 70 B checkpoint is hashed once, not at
    every load. Files are hashed several at a time (threads); under ``torch.distributed`` file *i* is hashed by
    rank *i* mod N and the hashes gathered, so the job reads each file once for the fingerprint and every rank
    gets the same one; rank 0 alone writes the cache. Prefix ``sha256-files:`` (weights hashes are ``sha256:``)."""
    from .. import distributed as D

    files = checkpoint_files(path)
    if not files:
        from ..errors import BiaslabError

        raise BiaslabError(f"{path} holds no weights file (*.safetensors, pytorch_model*.bin or *.gguf)")
    cache = _read_cache(cache_file)
    W = D.world_size()
    me = D.rank() % W
    recs, todo = {}, []
    for i, f in enumerate(files):
        if i % W != me:
            continue
        st, rec = f.stat(), cache.get(str(f.resolve()))
        if isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            recs[i] = rec
        else:
            recs[i] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            todo.append(i)
    for i, digest in zip(todo, _hash_files([files[i] for i in todo], progress) if todo else []):
        recs[i]["sha256"] = digest
    dirty = bool(todo)
    if W > 1:   # every rank calls this (the model is loaded on every rank): one gather, the same hashes everywhere
        import socket

        gathered = D.all_gather((recs, dirty, copy_signature(files), socket.gethostname()))
        hosts = [g[3] for g in gathered]
        for r, g in enumerate(gathered):   # every rank sees every signature: all raise the same line
            if g[2] != gathered[0][2]:
                from ..errors import BiaslabError

                raise BiaslabError(_copies_differ(path, r, hosts, gathered[0][2], g[2]))
        recs = {i: r for part, _, _, _ in gathered for i, r in part.items()}
        dirty = any(g[1] for g in gathered)
    h = hashlib.sha256()
    for i, f in enumerate(files):
        h.update(f"{f.name}:{recs[i]['sha256']}\n".encode())
        cache[str(f.resolve())] = recs[i]
    if dirty and cache_file is not None and D.is_main():
        _write_cache(cache_file, cache)
    return "sha256-files:" + h.hexdigest()
