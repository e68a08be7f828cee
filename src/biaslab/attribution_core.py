"""The attribution engine's shared parts: option names and checks, the hooks that capture each site's activation
(with a gate for integrated gradients), the gradient root at the input embeddings, and the position reductions.
Used by :mod:`biaslab.attribution` (decoder-only models) and :mod:`biaslab.attribution_seq2seq` (T5-style)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import BiaslabError, UnknownNameError
from .interventions import Hooks, Intervention
from .models.sites import Site

SPANS = ("all", "prompt", "answer")
REDUCES = ("max", "mean", "sum")
OBJECTIVES = ("logprob", "prob")


def check_options(*, span: str = "all", reduce: str = "max", objective: str = "logprob") -> None:
    if span not in SPANS:
        raise UnknownNameError("attribution span", span, SPANS)
    if reduce not in REDUCES:
        raise UnknownNameError("attribution reduction", reduce, REDUCES)
    if objective not in OBJECTIVES:
        raise UnknownNameError("attribution objective", objective, OBJECTIVES)


@contextmanager
def _frozen_params_grad_from_embeddings(model):
    """Freeze parameters (so the backward computes activation gradients only and the forward saves less) and
    make the input embeddings' output require grad, so every downstream activation is in the graph."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    embs = [model.get_input_embeddings()]
    if getattr(model.config, "is_encoder_decoder", False):   # T5's stacks may hold their own embedding modules
        for stack in (model.get_encoder(), model.get_decoder()):
            e = stack.get_input_embeddings()
            if all(e is not x for x in embs):
                embs.append(e)
    try:
        with Hooks([Intervention(f"attribution:embeddings-require-grad:{k}", e, "replace_output",
                                 lambda o: o.requires_grad_(True)) for k, e in enumerate(embs)]), torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def other_experts(model, sites: list[Site]) -> list[Site]:
    """The MoE experts sites of ``model`` that ``sites`` leave out (none on a dense model): a pass recomputes them
    unedited, so its numbers do not depend on which sites it hooks."""
    from .models.sites import find_sites, model_family

    try:
        if model_family(model) != "moe":
            return []
    except BiaslabError:
        return []
    names = {s.name for s in sites}
    return [s for s in find_sites(model, "ffn") if s.expert_width and s.name not in names]


class _SiteHooks:
    """Captures each site's activation h (pre-gate) and the tensor s = g·h actually used downstream, whose
    gradient is taken. Gates default to 1 (then s is h itself)."""

    def __init__(self, sites: list[Site], gates: dict[str, float] | None = None, others: list[Site] = ()):
        self.sites = sites
        self.gates = gates or {}
        self.others = list(others)   # MoE experts not hooked in this pass: recomputed unedited (see __enter__)
        self.h: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}

    bt: tuple[int, int] | None = None   # (batch, tokens) of the pass: OPT feeds its FFN (B·T, U) matrices

    def _gate(self, name: str, h: torch.Tensor) -> torch.Tensor:
        g = self.gates.get(name, 1.0)
        flat = h.dim() == 2 and self.bt is not None and h.shape[0] == self.bt[0] * self.bt[1]
        h3 = h.view(*self.bt, h.shape[-1]) if flat else h      # always (B, T, U) for the scores
        s = h3 if g == 1.0 else h3 * g
        if name not in self.s:   # the forward pass; a checkpointed layer's recomputation in backward is not recorded
            self.h[name] = h3.detach()
            self.s[name] = s
        return s.reshape(h.shape) if flat else s

    def __enter__(self):
        ivs = []
        for site in self.sites:
            if site.kind not in ("ffn", "linear"):
                raise UnknownNameError("site kind", site.kind, ("ffn", "linear"))
            # ffn: the down projection's input (a MoE layer's routed expert activations); linear: the output
            ivs.append(Intervention(f"attribution:{site.name}", site.module, site.edit_kind,
                                    lambda h, name=site.name: self._gate(name, h)))
        # a MoE layer whose experts are not among this pass's sites still runs biaslab's recomputation (unedited),
        # so a pass over some layers (layers_per_pass) computes exactly what a pass over all of them does
        ivs += [Intervention(f"attribution:recompute:{o.name}", o.module, "edit_experts", lambda a: a)
                for o in self.others]
        self.hooks = Hooks(ivs).attach()
        return self

    def __exit__(self, *exc):
        self.hooks.remove()

    def release(self) -> None:
        """Drop the captured activations and the hooks (whose closures point back here): without this the
        reference cycle keeps every site's activation alive until Python's cycle collector happens to run, so
        successive attribution passes pile up memory."""
        self.h, self.s, self.hooks = {}, {}, None


def span_mask(mask: torch.Tensor, answer_cols: torch.Tensor, span: str, answer_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, T) mask of the positions that enter the reduction. The answer positions are
    ``(answer_rows[k], answer_cols[k])`` (default: one per row, ``answer_cols[r]`` for row r)."""
    m = mask.bool().clone()
    ans = torch.zeros_like(m)
    rows = torch.arange(m.shape[0], device=m.device) if answer_rows is None else answer_rows
    ans[rows, answer_cols] = True
    if span == "all":
        return m
    if span == "answer":
        return ans
    if span == "prompt":
        return m & ~ans
    raise UnknownNameError("attribution span", span, SPANS)


def reduce_positions(a: torch.Tensor, pmask: torch.Tensor, reduce: str) -> torch.Tensor:
    """(B, T, U) per-position scores → (B, U) over the masked positions (the mask moves to the scores' device:
    under a device map a layer's activations sit on its own GPU)."""
    pm = pmask[:, :, None].to(a.device)
    if reduce == "max":
        return a.masked_fill(~pm, float("-inf")).amax(dim=1)
    s = a.masked_fill(~pm, 0.0).sum(dim=1)
    if reduce == "sum":
        return s
    if reduce == "mean":
        return s / pm.sum(dim=1).clamp(min=1).to(s.dtype)
    raise UnknownNameError("attribution reduction", reduce, REDUCES)


class PassMethods:
    """What every attribution pass shares once its forward ran (``logprobs``, ``rows``, ``hooks``, the
    continuation's log-probability): the objective, the reduced activation × gradient, and the exit."""

    checkpoint_layers: bool = False

    def hooked_forward(self, forward):
        """Run ``forward()`` with every site hooked and the graph rooted at the input embeddings; the pass keeps
        that state until its exit (which undoes it; an error in ``forward`` undoes it at once).

        With ``checkpoint_layers`` each layer is checkpointed (:func:`checkpointed_layers`): the backward pass
        recomputes a layer's activations instead of keeping them, so the site hooks stay attached (and gate the
        recomputation the same way) until the pass exits."""
        self._ctx = _frozen_params_grad_from_embeddings(self.lm.model)
        self._ctx.__enter__()
        self.hooks = _SiteHooks(self.sites, self.gates, other_experts(self.lm.model, self.sites))
        self._ckpt = None
        try:
            if self.checkpoint_layers:
                self._ckpt = checkpointed_layers(self.lm.model)
                self._ckpt.__enter__()
                self.hooks.__enter__()
                return forward()
            with self.hooks:
                return forward()
        except BaseException:
            self._release()
            raise

    def _release(self):
        if self._ckpt is not None:
            self.hooks.__exit__(None, None, None)
            self._ckpt.__exit__(None, None, None)
            self._ckpt = None
        self._ctx.__exit__(None, None, None)

    def __exit__(self, *exc):
        self._release()
        if self.hooks is not None:
            self.hooks.release()
        self.hooks = None
        self.logprobs = None
        if getattr(self, "continuation_logprob", None) is not None:   # graph-connected
            self.continuation_logprob = None

    def objective(self, targets=None, objective: str = "logprob") -> torch.Tensor:
        """(B,) log P(target_r) or P(target_r) at each row's answer position (graph-connected). In continuation
        mode (``continuation=`` given) ``targets`` must be None: the objective is the log-probability of each row's
        continuation (the sum over its tokens), or its probability."""
        check_options(objective=objective)
        if self.continuation is not None:
            if targets is not None:
                raise BiaslabError("in continuation mode the targets are the sequences' own continuation tokens")
            lp = self.continuation_logprob
        else:
            lp = self.logprobs[self.rows, torch.as_tensor(list(targets), device=self.logprobs.device)]
        return lp if objective == "logprob" else lp.exp()

    def site_mask(self, name: str) -> torch.Tensor:
        """The (B, T) positions a site's scores are reduced over."""
        return self.pmask

    def attribute(self, values: torch.Tensor, *, retain_graph: bool = True) -> dict[str, torch.Tensor]:
        """{site: (B, n_units)} activation × ∂(values_r)/∂activation, reduced over the span of each row."""
        names = [s.name for s in self.sites]
        grads = torch.autograd.grad(values.sum(), [self.hooks.s[n] for n in names], retain_graph=retain_graph,
                                    allow_unused=True)
        self._n_backward += 1
        out = {}
        for n, g in zip(names, grads):
            h = self.hooks.h[n]
            a = torch.zeros_like(h, dtype=torch.float32) if g is None else h.float() * g.float()
            out[n] = reduce_positions(a, self.site_mask(n), self.reduce).cpu()
        return out


@contextmanager
def checkpointed_layers(model):
    """Activation checkpointing of every transformer layer (``torch.utils.checkpoint``, non-reentrant) for the
    block: a backward pass recomputes each layer's internals instead of keeping them, so attribution over every
    layer needs about one layer's activations at a time (plus the sites' own activations) — at the cost of one more
    forward pass. The layers are the containers of the neuron-site table."""
    import functools

    from torch.utils.checkpoint import checkpoint

    from .models.sites import SITE_TABLE, model_family

    layers = []
    for container in SITE_TABLE[model_family(model)]["layers"]:
        try:
            layers += list(model.get_submodule(container))
        except AttributeError:
            continue

    def wrapped(orig, *args, **kwargs):
        if not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        return checkpoint(orig, *args, use_reentrant=False, **kwargs)

    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = functools.partial(wrapped, layer.forward)
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward      # back to the class's forward
            else:
                layer.forward = own
