"""Tree attention through PyTorch's flex attention (``torch.nn.attention.flex_attention``) with a block mask.

The same exact computation as :func:`biaslab.models.packing.tree_attention` — each node of the flat sequence of
:func:`~biaslab.models.packing.tree_plan` attends to its ancestors and itself — as one kernel call per layer
instead of one batched SDPA per chain bucket. It rests on a property of :func:`~biaslab.models.packing.pack`'s
layout: sequences are laid out sorted, so every trie row is in depth-first pre-order and the subtree of node *a*
is the contiguous range ``a … end[a] − 1``. Node *k* is then an ancestor of (or is) node *q* exactly when
``k ≤ q < end[k]``, a mask described by one integer per node, which the block mask turns into skipped tiles on a
GPU (rows side by side never share a tile that is not skipped or masked).

Chosen with ``LanguageModel(tree_kernel="flex")`` or ``BIASLAB_TREE_KERNEL=flex`` (default ``sdpa``: the chain
buckets). On CUDA the kernel is compiled (``torch.compile(flex_attention, dynamic=True)``, once per process;
:func:`compile_flex`); on CPU flex attention runs unfused (it materialises each layer's full N × N scores), which
is correct — the tests use it — but about 13× slower than the buckets (``bench/tree_kernels.py``), so it is never
the CPU default. Which kernel is faster on a given GPU is what ``bench/gpu_check.py`` measures; until it has been
run there, ``sdpa`` stays the default everywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BiaslabError
from .packing import _no_mask, flat_sequence

FLEX_ATTENTION = "biaslab_tree_flex"
PLAN_KWARG = "biaslab_flex_plan"
TREE_KERNELS = ("sdpa", "flex")


def default_tree_kernel() -> str:
    """``BIASLAB_TREE_KERNEL`` (``sdpa`` | ``flex``), default ``sdpa``."""
    k = os.environ.get("BIASLAB_TREE_KERNEL", "sdpa").strip().lower() or "sdpa"
    if k not in TREE_KERNELS:
        raise BiaslabError(f"BIASLAB_TREE_KERNEL={k!r}: expected one of {', '.join(TREE_KERNELS)}")
    return k


@dataclass
class FlexPlan:
    n_nodes: int
    ends: torch.Tensor        # (N,) exclusive end of each node's subtree in the flat sequence
    block_mask: object        # torch.nn.attention.flex_attention.BlockMask

    def to(self, device, non_blocking: bool = False) -> "FlexPlan":
        """The plan on ``device`` (once per device, then reused; see ``TreePlan.to``: device-map hooks move every
        forward kwarg to each layer's GPU)."""
        device = torch.device(device)
        if self.ends.device == device:
            return self
        moved = self.__dict__.setdefault("_moved", {})
        if device not in moved:
            moved[device] = FlexPlan(self.n_nodes, self.ends.to(device), self.block_mask.to(device))
        return moved[device]


def subtree_ends(parents: list[list[int]]) -> np.ndarray:
    """For rows given by their parent arrays (laid out one after another), each node's subtree end in the flat
    sequence: ``end[a]`` = 1 + the flat index of a's last descendant (a itself when a leaf)."""
    out, off = [], 0
    for parent in parents:
        n = len(parent)
        end = np.arange(1, n + 1, dtype=np.int64)
        for j in range(n - 1, -1, -1):
            p = parent[j]
            if p >= 0 and end[j] > end[p]:
                end[p] = end[j]
        out.append(end + off)
        off += n
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def is_ancestor(ends: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Whether key node ``kv`` is an ancestor of (or is) query node ``q``: ``kv ≤ q < end[kv]`` (the block
    mask's rule)."""
    return (kv <= q) & (q < ends[kv])


def ancestor_mask(ends: torch.Tensor) -> torch.Tensor:
    """The (N, N) boolean mask of :func:`is_ancestor` (query rows, key columns), materialised (tests)."""
    idx = torch.arange(len(ends), device=ends.device)
    return is_ancestor(ends, idx[:, None], idx[None, :])


def flex_plan(rows, device) -> tuple[torch.Tensor, torch.Tensor, list[int], FlexPlan]:
    """The rows concatenated into one flat sequence (input ids, position ids, row offsets) and its block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    _register()
    ids, pos, offsets = flat_sequence(rows, device)
    n = ids.shape[1]
    ends = torch.from_numpy(subtree_ends([r.parent for r in rows])).to(device)
    block = create_block_mask(lambda b, h, q, kv: is_ancestor(ends, q, kv), None, None, n, n, device=str(device))
    return ids, pos, offsets, FlexPlan(n, ends, block)


_compiled = None
_registered = False


def _register() -> None:
    """Register :func:`flex_tree_attention` (and a mask function that builds no dense mask) with transformers, once."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(FLEX_ATTENTION, flex_tree_attention)
        AttentionMaskInterface.register(FLEX_ATTENTION, _no_mask)
        _registered = True


def compile_flex(device_type: str) -> bool:
    """Whether flex attention is compiled: ``BIASLAB_FLEX_COMPILE`` = 1 / 0, default (``auto``) on CUDA only. On
    the 2-core CPU compiled flex attention only drew level with the SDPA buckets (11.6 s vs 11.2 s for 120 BBQ
    requests, after a compile of about 25 s; ``bench/tree_kernels.py --compile``), so the CPU keeps the buckets
    and compiles nothing by default."""
    v = os.environ.get("BIASLAB_FLEX_COMPILE", "auto").strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    if v != "auto":
        raise BiaslabError(f"BIASLAB_FLEX_COMPILE={v!r}: expected 1, 0 or auto")
    return device_type == "cuda"


def _kernel(device_type: str):
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_flex(device_type):
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def flex_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for :data:`FLEX_ATTENTION`: query (1, H, N, D), key/value (1, H_kv, N, D)
    over the flat sequence of :func:`flex_plan`; returns (1, N, H, D)."""
    import warnings

    plan: FlexPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None or query.shape[0] != 1 or query.shape[2] != plan.n_nodes:
        raise RuntimeError(f"{FLEX_ATTENTION} attention needs its flat-sequence plan "
                           f"(got {tuple(query.shape)}, plan {'missing' if plan is None else plan.n_nodes})")
    if module.training and dropout:
        raise RuntimeError(f"{FLEX_ATTENTION} is for scoring: no attention dropout")
    with warnings.catch_warnings():   # the unfused CPU path warns once that it is unfused; that is known here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _kernel(query.device.type)(query, key, value, block_mask=plan.block_mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None
