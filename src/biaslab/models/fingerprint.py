"""The identity of a base model: a sha256 over its weights (patches check it before they apply)."""
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
