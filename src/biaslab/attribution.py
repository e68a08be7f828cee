"""Neuron attribution: activation × gradient and integrated gradients over the neuron sites of any causal LM.

General engine (not CRISPR-specific; CRISPR, docs/methods/crispr.md, builds on it in ``biaslab.methods.crispr``).

Neurons are the units of :func:`biaslab.models.sites.find_sites`: FFN intermediate neurons (the input ``h`` of
each layer's down projection, captured by a forward *pre*-hook) or every linear output unit (the module output,
captured by a forward hook). One batched forward pass captures ``h`` at every site of every layer; the gradient
of an objective with respect to all of them comes from one ``torch.autograd.grad`` call (no parameter gradients
are computed: parameters are frozen for the pass and the graph is rooted at the input embeddings instead).

Objective. For row r with answer position p_r (the last prompt token, whose output predicts the answer) and a
target token y_r, the objective is ``log P(y_r | prompt_r)`` (``objective="logprob"``, default) or
``P(y_r | prompt_r)`` (``objective="prob"``), soft-maxed over the full vocabulary. Rows never interact, so the
gradient of the row sum gives every row's own gradient: different targets per row cost nothing extra.

Continuation mode (``AttributionPass(..., continuation=[c_r])``): the last c_r tokens of row r are a scored
continuation (a multiple-choice option's text) and the objective is ``log P(continuation_r | context_r)`` =
the sum over its tokens (or that sequence's probability), the answer positions being the c_r positions that
predict them.

Per-position attribution ``A[r, t, i] = h[r, t, i] · ∂F_r/∂h[r, t, i]`` is reduced over a span of positions:
``span="all"`` (every real prompt token, the answer position included; default), ``"prompt"`` (every real
token except the answer position) or ``"answer"`` (the answer position only), by ``reduce="max"`` (default,
the paper's token max), ``"mean"`` or ``"sum"``. Padding is masked out of every reduction (and, being after the
real tokens under right padding with causal attention, never influences them), so a row's scores do not depend
on what it is batched with.

Integrated gradients (Sundararajan et al. 2017), zero baseline, m midpoint-Riemann steps α = (k − ½)/m (error
O(1/m²); the original uses right Riemann sums, O(1/m)): each site's
activation is multiplied by a gate g (via the same hooks) and the attribution is
``IG_i = mean_k h_i(α_k) · ∂F/∂(g_i h_i)|_{g=α_k}`` — the exact path integral over the gate variables, so
``Σ_i IG_i → F(g=1) − F(g=0)`` (completeness; the tests check it). ``mode="joint"`` scales every site at
once; ``mode="layer"`` scales one layer at a time with the others intact (Dai et al. 2022, knowledge neurons),
costing ``m × n_layers`` forward+backward passes — the comparison in ``bench/crispr_attribution.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .attribution_core import (OBJECTIVES, REDUCES, SPANS, PassMethods,  # noqa: F401
                               _frozen_params_grad_from_embeddings, _SiteHooks, check_options, other_experts,
                               reduce_positions, span_mask)
from .errors import BiaslabError, UnknownNameError
from .models.packing import batch_rows
from .models.sites import Site, find_sites
from .models.spans import check_context


def resolve_sites(lm, sites: str | Sequence[Site]) -> list[Site]:
    if getattr(lm.model.config, "is_encoder_decoder", False) and not getattr(lm, "is_seq2seq", False):
        raise BiaslabError("attribution needs a causal (decoder-only) language model; "
                           f"{type(lm.model).__name__} is an encoder-decoder")
    return find_sites(lm.model, sites) if isinstance(sites, str) else list(sites)


class AttributionPass(PassMethods):
    """One batched forward pass with every site hooked; call :meth:`attribute` once per objective.

    >>> with AttributionPass(lm, sites, token_seqs) as ap:
    ...     lp = ap.logprobs                    # (B, V) log-softmax at each row's answer position
    ...     a = ap.attribute(lp[rows, targets]) # {site name: (B, n_units)} reduced activation × gradient
    """

    def __init__(self, lm, sites: list[Site], seqs: list[list[int]], *, span: str = "all", reduce: str = "max",
                 gates: dict[str, float] | None = None, continuation: Sequence[int] | None = None,
                 checkpoint_layers: bool = False):
        check_options(span=span, reduce=reduce)
        self.checkpoint_layers = checkpoint_layers
        if not seqs or any(len(s) == 0 for s in seqs):
            raise BiaslabError("attribution needs at least one non-empty token sequence")
        if continuation is not None:
            continuation = list(continuation)
            if len(continuation) != len(seqs):
                raise BiaslabError(f"{len(seqs)} sequences but {len(continuation)} continuation lengths")
            bad = [k for k, (c, s) in enumerate(zip(continuation, seqs)) if not 1 <= c < len(s)]
            if bad:
                raise BiaslabError(f"continuation length of row {bad[0]} is {continuation[bad[0]]}; it must be ≥ 1 and "
                                   f"shorter than the sequence ({len(seqs[bad[0]])} tokens): a context must precede it")
        self.lm, self.sites, self.seqs = lm, sites, seqs
        self.span, self.reduce, self.gates = span, reduce, gates
        self.continuation = continuation
        self._n_backward = 0

    def __enter__(self):
        lm = self.lm

        def forward():
            ids, mask, pos, offs = lm.pad(self.seqs, side="right")
            self.hooks.bt = tuple(ids.shape)
            if self.continuation is None:
                self.rows = torch.arange(len(self.seqs), device=ids.device)
                self.cols = torch.tensor([offs[k] + len(s) - 1 for k, s in enumerate(self.seqs)], device=ids.device)
            else:  # the positions that predict each continuation token: len − c − 1 … len − 2
                rows, cols, nxt = [], [], []
                for k, (s, c) in enumerate(zip(self.seqs, self.continuation)):
                    for t in range(len(s) - c - 1, len(s) - 1):
                        rows.append(k)
                        cols.append(offs[k] + t)
                        nxt.append(s[t + 1])
                self.rows = torch.tensor(rows, device=ids.device)
                self.cols = torch.tensor(cols, device=ids.device)
                self._next = torch.tensor(nxt, device=ids.device)
            return lm.logits_at(ids, mask, pos, self.rows, self.cols), mask

        logits, mask = self.hooked_forward(forward)
        self.logprobs = torch.log_softmax(logits, dim=-1)
        if self.continuation is None:
            self.pmask = span_mask(mask, self.cols, self.span)
        else:
            tok = self.logprobs[torch.arange(len(self._next), device=self._next.device), self._next]
            self.continuation_logprob = torch.zeros(len(self.seqs), dtype=tok.dtype, device=tok.device).index_add(
                0, self.rows, tok)
            self.pmask = span_mask(mask, self.cols, self.span, answer_rows=self.rows)
        return self


def attribution_pass(lm, sites: list[Site], seqs: list[list[int]], **kw):
    """:class:`AttributionPass`, or on an encoder-decoder (:class:`~biaslab.models.seq2seq.Seq2SeqLanguageModel`)
    its counterpart :class:`~biaslab.attribution_seq2seq.Seq2SeqAttributionPass` (same interface)."""
    if getattr(lm, "is_seq2seq", False):
        from .attribution_seq2seq import Seq2SeqAttributionPass

        return Seq2SeqAttributionPass(lm, sites, seqs, **kw)
    return AttributionPass(lm, sites, seqs, **kw)


def site_groups(sites: list[Site], layers_per_pass: int | None) -> list[list[Site]]:
    """The sites cut into groups of ``layers_per_pass`` consecutive layers (one group: all of them, when None).

    Layer chunking: each group gets its own forward and backward passes, so only its activations and gradients are
    held at once (memory ∝ the group, time ∝ the number of groups). The forward values do not depend on which sites
    are hooked (an ungated hook passes the activation through), so every site's score is the one an all-sites pass
    gives (the tests check it on every family)."""
    if layers_per_pass is None:
        return [list(sites)]
    if layers_per_pass < 1:
        raise BiaslabError(f"layers per attribution pass must be >= 1, got {layers_per_pass}")
    layers = sorted({s.layer for s in sites})
    chunks = [set(layers[k:k + layers_per_pass]) for k in range(0, len(layers), layers_per_pass)]
    return [[s for s in sites if s.layer in c] for c in chunks]


def token_batches(lm, seqs: list[list[int]], token_budget: int = 1024, max_batch: int = 16) -> list[list[int]]:
    """Indices of ``seqs`` packed longest-first so that batch_size × max_len ≤ token_budget (the engine's
    :func:`~biaslab.models.packing.batch_rows` on the sequences' lengths)."""
    return batch_rows([len(s) for s in seqs], token_budget, max_batch)


def activation_x_gradient(lm, seqs: list[list[int]], targets: Sequence[int], *, sites: str | Sequence[Site] = "ffn",
                          span: str = "all", reduce: str = "max", objective: str = "logprob",
                          token_budget: int = 1024, checkpoint_layers: bool = False,
                          layers_per_pass: int | None = None) -> dict[str, torch.Tensor]:
    """{site: (N, n_units)} activation × gradient of F_r = log P / P(targets[r] | seqs[r]) for every row,
    batched by a token budget (results do not depend on the batching), ``layers_per_pass`` layers' sites per
    pass (:func:`site_groups`; default all)."""
    check_options(span=span, reduce=reduce, objective=objective)
    site_list = resolve_sites(lm, sites)
    if len(targets) != len(seqs):
        raise BiaslabError(f"{len(seqs)} sequences but {len(targets)} targets")
    check_context(lm, seqs, what="attribution")
    out = {s.name: torch.zeros(len(seqs), s.n_units) for s in site_list}
    for group in site_groups(site_list, layers_per_pass):
        for batch in token_batches(lm, seqs, token_budget):
            with attribution_pass(lm, group, [seqs[i] for i in batch], span=span, reduce=reduce,
                                  checkpoint_layers=checkpoint_layers) as ap:
                a = ap.attribute(ap.objective([targets[i] for i in batch], objective), retain_graph=False)
            for n, v in a.items():
                out[n][batch] = v
    return out


def integrated_gradients(lm, seqs: list[list[int]], targets: Sequence[int], *, sites: str | Sequence[Site] = "ffn",
                         steps: int = 20, mode: str = "joint", span: str = "all", reduce: str = "max",
                         objective: str = "logprob", token_budget: int = 1024) -> dict[str, torch.Tensor]:
    """{site: (N, n_units)} integrated gradients with a zero baseline and ``steps`` midpoint-Riemann steps.

    Per position ``IG[r,t,i] = (1/m) Σ_k h[r,t,i](α_k) · ∂F_r/∂s[r,t,i]|_{α_k}`` (s = gated activation), then
    reduced over the span like activation × gradient. ``mode="joint"``: all sites gated together;
    ``mode="layer"``: one layer's sites at a time, the rest intact (knowledge-neurons style)."""
    check_options(span=span, reduce=reduce, objective=objective)
    if steps < 1:
        raise BiaslabError(f"integrated gradients needs at least 1 step, got {steps}")
    if mode not in ("joint", "layer"):
        raise UnknownNameError("integrated-gradients mode", mode, ("joint", "layer"))
    site_list = resolve_sites(lm, sites)
    check_context(lm, seqs, what="attribution")
    groups: list[list[Site]]
    if mode == "joint":
        groups = [site_list]
    else:
        by_layer: dict[int, list[Site]] = {}
        for s in site_list:
            by_layer.setdefault(s.layer, []).append(s)
        groups = [by_layer[k] for k in sorted(by_layer)]
    out = {s.name: torch.zeros(len(seqs), s.n_units) for s in site_list}
    for batch in token_batches(lm, seqs, token_budget):
        sub = [seqs[i] for i in batch]
        tg = [targets[i] for i in batch]
        for group in groups:
            acc = None
            for k in range(steps):
                alpha = (k + 0.5) / steps
                gates = {s.name: alpha for s in group}
                with AttributionPass(lm, group, sub, span=span, reduce="sum", gates=gates) as ap:
                    names = [s.name for s in group]
                    grads = torch.autograd.grad(ap.objective(tg, objective).sum(), [ap.hooks.s[n] for n in names],
                                                allow_unused=True)
                    per = {n: (ap.hooks.h[n].float() * g.float() if g is not None else torch.zeros_like(ap.hooks.h[n]))
                           for n, g in zip(names, grads)}
                    pmask = ap.pmask
                if acc is None:
                    acc = per
                else:
                    for n in acc:
                        acc[n] += per[n]
            for n, v in acc.items():
                out[n][batch] = reduce_positions(v / steps, pmask, reduce).cpu()
    return out


def objective_values(lm, seqs: list[list[int]], targets: Sequence[int], *, objective: str = "logprob",
                     gates: dict[str, float] | None = None, sites: str | Sequence[Site] = "ffn") -> torch.Tensor:
    """(N,) objective values, optionally with sites gated (g = 0 → the zero baseline of IG)."""
    site_list = resolve_sites(lm, sites)
    with torch.no_grad(), _SiteHooks(site_list, gates, other_experts(lm.model, site_list)):
        ids, mask, pos, offs = lm.pad(seqs, side="right")
        rows = torch.arange(len(seqs), device=ids.device)
        cols = torch.tensor([offs[k] + len(s) - 1 for k, s in enumerate(seqs)], device=ids.device)
        lp = torch.log_softmax(lm.logits_at(ids, mask, pos, rows, cols), dim=-1)
        v = lp[rows, torch.as_tensor(list(targets), device=lp.device)]
    return v if objective == "logprob" else v.exp()


def rank_neurons(scores: dict[str, torch.Tensor], n: int | None = None) -> list[tuple[str, int, float]]:
    """All neurons of all sites ranked together by score (highest first); ties broken by site order, then
    unit index, so the ranking is deterministic. NaN scores (an overflow in a half-precision model) are an error:
    a sort would quietly put them last, or first."""
    names = list(scores)
    bad = [k for k in names if scores[k].isnan().any()]
    if bad:
        raise BiaslabError(f"attribution scores are NaN at {len(bad)} of {len(names)} sites (first: {bad[0]}): an "
                           "overflow inside a half-precision model (rerun with --dtype float32) or NaN/inf weights (check "
                           "the checkpoint)")
    flat = torch.cat([scores[k].reshape(-1).double() for k in names])
    site_of = torch.cat([torch.full((scores[k].numel(),), j, dtype=torch.long) for j, k in enumerate(names)])
    unit_of = torch.cat([torch.arange(scores[k].numel()) for k in names])
    order = torch.argsort(-flat, stable=True)
    if n is not None:
        order = order[:n]
    return [(names[int(site_of[i])], int(unit_of[i]), float(flat[i])) for i in order]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat score vectors (average ranks for ties)."""
    import numpy as np
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a.reshape(-1), dtype=float), np.asarray(b.reshape(-1), dtype=float)).statistic)
