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


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
CHUNK = 8 << 20


def _sha256_stream(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def checkpoint_files(path) -> list:
    """The files that define a checkpoint: its weights (safetensors shards, else PyTorch .bin shards, or one .gguf
    file) and config.json, in name order."""
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return [p]
    weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin")) or sorted(p.glob("*.gguf"))
    cfg = p / "config.json"
    return weights + ([cfg] if cfg.is_file() else [])


def checkpoint_fingerprint(path, cache_file=None) -> str:
    """The identity of a checkpoint on disk, from its files, never from the loaded weights: sha256 over each file's
    name and streamed sha256 (read once, 8 MiB at a time), so it is the same whatever dtype or device map the
    model is loaded with, and a 70 B checkpoint is not re-hashed at every load — each file's hash is cached in
    ``cache_file`` by absolute path, size and mtime. Prefix ``sha256-files:`` (weights hashes are ``sha256:``)."""
    import json
    import os
    from pathlib import Path

    files = checkpoint_files(path)
    if not files:
        from ..errors import BiaslabError

        raise BiaslabError(f"{path} holds no weights file (*.safetensors, pytorch_model*.bin or *.gguf)")
    cache = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    h, dirty = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        rec = cache.get(key)
        if not (isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns):
            rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_stream(f)}
            cache[key], dirty = rec, True
        h.update(f"{f.name}:{rec['sha256']}\n".encode())
    if dirty and cache_file is not None:
        cf = Path(cache_file)
        try:
            cf.parent.mkdir(parents=True, exist_ok=True)
            tmp = cf.with_name(f".{cf.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cf)
        except OSError:
            pass   # a read-only cache only costs a re-hash next time
    return "sha256-files:" + h.hexdigest()
