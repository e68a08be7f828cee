"""Prefix-sharing packing: many token sequences in few rows, shared prefixes encoded once, no padding.

Under causal attention a token's hidden states depend only on the tokens before it, so sequences with a
common prefix can share that prefix's computation. :func:`pack` sorts the sequences lexicographically and
lays them out as *prefix tries*, several per row: every sequence is a root-to-leaf path, and the nodes it shares
with the sequence before it (their longest common prefix, which for sorted sequences is the longest shared with
any earlier one) are reused rather than repeated. Each row is then one forward pass with

- a 4-D attention mask in which a node attends to exactly its ancestors and itself (so sequences packed side
  by side never see each other), and
- position ids equal to the node's depth,

which makes every logit the same as running the sequence alone, up to float noise (the tests check this).

What it saves: BBQ's prompts for one item under M instructions share the item's tokens (prompt layout v2,
:func:`biaslab.tasks.render_mc`); lm-evaluation-harness-style requests share their context across options;
CrowS-Pairs sentences share their start; and every chat prompt shares the system preamble. Rows are filled up
to ``row_tokens`` nodes, so short sequences are packed side by side instead of padded.

Two ways to run the rows (:meth:`biaslab.models.lm.LanguageModel.scoring_mode`):

- **tree attention** (the default where the model supports it; bottom of this module): the rows of a forward
  pass are concatenated into one unpadded sequence and each chain of nodes attends only to its ancestors,
  batched by size — no padding, and only ≈ 1.5× the ancestor pairs are computed instead of the whole row;
- **dense-mask rows** (the fallback): one row per batch entry with the 4-D mask above. Attention then runs
  densely over the row (the mask hides, it does not skip), so rows are kept short (512 nodes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PackedRow:
    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)   # index of the parent node in this row, -1 for a root
    depth: list[int] = field(default_factory=list)    # position id
    members: list[int] = field(default_factory=list)  # indices of the sequences laid out in this row

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Packing:
    rows: list[PackedRow]
    row_of: list[int]            # per sequence: its row
    nodes_of: list[list[int]]    # per sequence: the node index of each of its tokens, in its row

    @property
    def n_nodes(self) -> int:
        return sum(len(r) for r in self.rows)


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def pack(seqs: list[list[int]], row_tokens: int = 512) -> Packing:
    """Lay ``seqs`` out as prefix tries in rows of at most ``row_tokens`` nodes (a longer sequence gets a row
    of its own). Deterministic: depends only on the sequences."""
    if row_tokens < 1:
        raise ValueError("row_tokens must be ≥ 1")
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i], i))
    rows: list[PackedRow] = []
    row_of = [0] * len(seqs)
    nodes_of: list[list[int]] = [[] for _ in seqs]
    row: PackedRow | None = None
    prev: int | None = None  # previous sequence placed in the current row
    for i in order:
        s = seqs[i]
        if not s:
            raise ValueError(f"sequence {i} is empty")
        shared = _lcp(seqs[prev], s) if (row is not None and prev is not None) else 0
        if row is None or (len(row) and len(row) + len(s) - shared > row_tokens):
            row = PackedRow()
            rows.append(row)
            prev, shared = None, 0
        path = nodes_of[prev][:shared] if prev is not None else []
        for t in range(shared, len(s)):
            row.parent.append(path[-1] if path else -1)
            row.depth.append(t)
            row.tokens.append(s[t])
            path.append(len(row.tokens) - 1)
        row.members.append(i)
        row_of[i] = len(rows) - 1
        nodes_of[i] = path
        prev = i
    return Packing(rows, row_of, nodes_of)


def batch_rows(lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped, longest first, so that count × longest ≤ ``token_budget`` and count ≤ ``max_batch``
    (packed rows, and the padded batches of :class:`~biaslab.models.lm.LanguageModel`)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (w * (len(cur) + 1) > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def row_tensors(rows: list[PackedRow], pad_id: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, W), additive 4-D attention mask (B, 1, W, W) of ``dtype`` and position ids (B, W).

    Padding nodes (after a row's last node) attend only to themselves, so no row of the mask is empty."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    allowed = np.zeros((len(rows), width, width), dtype=bool)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = r.tokens
        pos[b, :n] = r.depth
        a = allowed[b]
        for j, p in enumerate(r.parent):
            if p >= 0:
                a[j] = a[p]
            a[j, j] = True
        idx = np.arange(n, width)
        a[idx, idx] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)
    return (torch.from_numpy(ids).to(device), mask[:, None].to(device), torch.from_numpy(pos).to(device))


# ---------------------------------------------------------------------------------------------- tree attention
#
# The dense 4-D mask above makes every node of a row attend over the whole row; on BBQ rows only ≈ 18 % of those
# (query, key) pairs are ancestor pairs, so most of the attention work is thrown away. Tree attention computes
# only what a node may see. A trie row laid out by :func:`pack` is a sequence of *chains* (runs of nodes whose
# parent is the node before); a chain's nodes attend to the chain head's ancestors (a path of earlier nodes) and,
# causally, to the chain itself. Chains are bucketed by size and each bucket is one batched
# ``scaled_dot_product_attention`` over gathered keys and values. Because attention no longer needs rows, the
# rows of a forward pass are concatenated into one unpadded sequence, so the linear layers see no padding
# either. It is exact (same logits up to float noise; tested), registered with transformers'
# ``AttentionInterface`` under :data:`TREE_ATTENTION`, and used only for models whose attention goes through
# that interface and is plain causal (no sliding window, soft-capping or position bias) — and only after the
# one-off self-check of :class:`~biaslab.models.lm.LanguageModel` has passed; otherwise the dense-mask rows are
# used.

TREE_ATTENTION = "biaslab_tree"
PLAN_KWARG = "biaslab_tree_plan"
WASTE = 1.25      # a bucket's padded rectangle may be this much larger than its chains' own rectangles
MAX_QUERY = 64    # chains are cut into pieces of at most this many queries
# Default trie-row budget (nodes) per scoring mode: dense masks cost W² per row, so rows stay short; tree
# attention costs only ancestor pairs, so longer rows share more (measured on 100 BBQ items × 3 instructions:
# 21,819 nodes at 512, 19,833 at 1,024, 19,694 at 2,048; bench/README.md).
ROW_TOKENS = {"dense": 512, "tree": 1024}


@dataclass
class TreeBucket:
    q_index: torch.Tensor   # (n, Q) flat node index of each query slot (0 for padding slots)
    k_index: torch.Tensor   # (n, K) flat node index of each key slot (0 for padding slots)
    mask: torch.Tensor      # (n, 1, Q, K) additive mask: 0 where the query may see the key
    src: torch.Tensor       # indices into the (n·Q) query slots that are real
    dst: torch.Tensor       # their flat node indices


@dataclass
class TreePlan:
    n_nodes: int
    buckets: list[TreeBucket]
    pairs_needed: int       # Σ over nodes of (number of ancestors + 1): the attention work that must be done
    pairs_executed: int     # Σ over buckets of n·Q·K: what the batched kernels compute

    def to(self, device, non_blocking: bool = False) -> "TreePlan":
        """This plan's tensors on ``device`` (copied once per device, then reused): Accelerate's device-map hooks
        call ``.to`` on every forward kwarg, so each layer of a model spread over GPUs gets the plan on its GPU."""
        device = torch.device(device)
        if self.buckets and self.buckets[0].mask.device == device:
            return self
        moved = self.__dict__.setdefault("_moved", {})
        if device not in moved:
            mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
            moved[device] = TreePlan(self.n_nodes, [TreeBucket(mv(b.q_index), mv(b.k_index), mv(b.mask), mv(b.src),
                                                               mv(b.dst)) for b in self.buckets],
                                     self.pairs_needed, self.pairs_executed)
        return moved[device]


def chains(row: PackedRow) -> list[tuple[list[int], int, int]]:
    """The row's chains as ``(ancestors of the head, start, end)``: nodes ``start..end-1`` each have the node
    before as parent (the head excepted); the ancestors are the head's root-to-parent path, in order."""
    n = len(row)
    heads = [j for j in range(n) if j == 0 or row.parent[j] != j - 1]
    out = []
    for a, h in enumerate(heads):
        end = heads[a + 1] if a + 1 < len(heads) else n
        anc, p = [], row.parent[h]
        while p >= 0:
            anc.append(p)
            p = row.parent[p]
        out.append((anc[::-1], h, end))
    return out


def flat_batches(lengths: list[int], token_budget: int, max_rows: int) -> list[list[int]]:
    """Consecutive row indices grouped so that their total length is ≤ ``token_budget`` (a longer row goes
    alone) and at most ``max_rows`` rows go together: the forward passes of tree attention, which pads nothing."""
    batches, cur, total = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (total + n > token_budget or len(cur) >= max_rows):
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        batches.append(cur)
    return batches


def _buckets(items: list[tuple[list[int], int, int]], waste: float) -> list[list[tuple[list[int], int, int]]]:
    """Group chains ``(key indices before the chain, flat start, length)`` for batched attention: sorted by
    length, a chain joins the current group while the group's padded rectangle n·Q·K stays within ``waste`` ×
    the sum of its chains' own rectangles (plus a small slack, so tiny chains are not run one by one)."""
    items = sorted(items, key=lambda c: (-c[2], -(len(c[0]) + c[2]), c[1]))
    groups, cur, own, q, k = [], [], 0, 0, 0
    for c in items:
        cq, ck = c[2], len(c[0]) + c[2]
        nq, nk, nown = max(q, cq), max(k, ck), own + cq * ck
        if cur and (len(cur) + 1) * nq * nk > waste * nown + 4096:
            groups.append(cur)
            cur, nq, nk, nown = [], cq, ck, cq * ck
        cur.append(c)
        q, k, own = nq, nk, nown
    if cur:
        groups.append(cur)
    return groups


def flat_sequence(rows: list[PackedRow], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The rows concatenated into one unpadded sequence: input ids (1, N), position ids (1, N), each row's offset."""
    offsets, ids, pos = [], [], []
    for r in rows:
        offsets.append(len(ids))
        ids += r.tokens
        pos += r.depth
    return (torch.tensor([ids], dtype=torch.long, device=device), torch.tensor([pos], dtype=torch.long, device=device),
            offsets)


def tree_plan(rows: list[PackedRow], dtype: torch.dtype, device, *, waste: float = WASTE,
              max_query: int = MAX_QUERY) -> tuple[torch.Tensor, torch.Tensor, list[int], TreePlan]:
    """The rows concatenated into one unpadded sequence: input_ids (1, N), position ids (1, N), each row's
    offset, and the :class:`TreePlan` that :func:`tree_attention` follows.

    Chains longer than ``max_query`` are cut into pieces of at most that many queries (each piece sees the
    ancestors and the chain's earlier nodes), which keeps the masked-out causal triangle of long chains small."""
    ids, pos, offsets = flat_sequence(rows, device)
    items = []
    for r, off in zip(rows, offsets):
        for anc, s, e in chains(r):
            before = [off + a for a in anc]
            for a in range(s, e, max_query):
                b = min(a + max_query, e)
                items.append((before + list(range(off + s, off + a)), off + a, b - a))
    neg = torch.finfo(dtype).min
    buckets, executed = [], 0
    for group in _buckets(items, waste):
        n, Q, K = len(group), max(c[2] for c in group), max(len(c[0]) + c[2] for c in group)
        qi = np.zeros((n, Q), dtype=np.int64)
        ki = np.zeros((n, K), dtype=np.int64)
        allowed = np.zeros((n, Q, K), dtype=bool)
        real = np.zeros((n, Q), dtype=bool)
        tri = np.tril(np.ones((Q, Q), dtype=bool))
        for b, (anc, s, L) in enumerate(group):
            A = len(anc)
            qi[b, :L] = np.arange(s, s + L)
            real[b, :L] = True
            ki[b, :A] = anc
            ki[b, A:A + L] = np.arange(s, s + L)
            allowed[b, :L, :A] = True
            allowed[b, :L, A:A + L] = tri[:L, :L]
            allowed[b, L:, 0] = True   # padding query slots: any one key, so no softmax row is empty
        mask = torch.zeros((n, 1, Q, K), dtype=dtype)
        mask.masked_fill_(torch.from_numpy(~allowed)[:, None], neg)
        flat_real = real.reshape(-1)
        buckets.append(TreeBucket(torch.from_numpy(qi).to(device), torch.from_numpy(ki).to(device), mask.to(device),
                                  torch.from_numpy(np.flatnonzero(flat_real)).to(device),
                                  torch.from_numpy(qi.reshape(-1)[flat_real]).to(device)))
        executed += n * Q * K
    needed = sum(d + 1 for r in rows for d in r.depth)
    return ids, pos, offsets, TreePlan(ids.shape[1], buckets, needed, executed)


def tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``AttentionInterface``) for :data:`TREE_ATTENTION`: query (1, H, N, D),
    key/value (1, H_kv, N, D) over the flat sequence of :func:`tree_plan`; returns (1, N, H, D)."""
    plan: TreePlan | None = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise RuntimeError(f"{TREE_ATTENTION} attention called without a tree plan (the model does not pass "
                           "attention kwargs through); use packing with dense masks")
    B, H, N, D = query.shape
    if B != 1 or N != plan.n_nodes:
        raise RuntimeError(f"{TREE_ATTENTION}: expected one flat sequence of {plan.n_nodes} nodes, got {tuple(query.shape)}")
    kvh = key.shape[1]
    qf = query[0].transpose(0, 1)   # (N, H, D)
    kf = key[0].transpose(0, 1)
    vf = value[0].transpose(0, 1)
    out = query.new_zeros(N, H, D)
    for bk in plan.buckets:
        n, Q = bk.q_index.shape
        q = qf[bk.q_index].transpose(1, 2)                 # (n, H, Q, D)
        k = kf[bk.k_index].transpose(1, 2)                 # (n, H_kv, K, D)
        v = vf[bk.k_index].transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bk.mask, scale=scaling,
                                                             dropout_p=dropout if module.training else 0.0,
                                                             enable_gqa=kvh != H)
        out.index_copy_(0, bk.dst, o.transpose(1, 2).reshape(n * Q, H, D).index_select(0, bk.src))
    return out[None], None


def _no_mask(*args, **kwargs):
    return None  # tree attention builds its own masks from the plan


_registered = False


def register_tree_attention() -> None:
    """Register :func:`tree_attention` (and a mask function that builds no dense mask) with transformers, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TREE_ATTENTION, tree_attention)
    AttentionMaskInterface.register(TREE_ATTENTION, _no_mask)
    _registered = True


def tree_attention_supported(model) -> bool:
    """Whether the model's attention is plain causal attention dispatched through transformers'
    ``AttentionInterface`` (sdpa or eager), with no sliding window, logit soft-capping or encoder-decoder."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return getattr(cfg, "attn_logit_softcapping", None) is None and getattr(cfg, "alibi", False) is False


class use_tree_attention:
    """Context manager: the model's attention implementation is ``impl`` (default :data:`TREE_ATTENTION`) inside,
    restored on exit."""

    def __init__(self, model, impl: str = TREE_ATTENTION):
        self.cfg = model.config
        self.impl = impl

    def __enter__(self):
        register_tree_attention()
        self.saved = self.cfg._attn_implementation
        self.cfg._attn_implementation = self.impl
        return self

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.saved
        return False
