"""Interventions on a model, one mechanism for all of biaslab: named hooks on modules (found through the sites
table), registered together and removed together on exit — the TransformerLens rule — and parameter overwrites
restored bit for bit.

Hook kinds (``fn`` receives tensors, never hook plumbing; a module whose output is a tuple — a decoder layer —
is seen through its first entry, the hidden states):

- ``capture_input`` / ``capture_output``: ``fn(x)`` observes the module's first input / its output;
- ``edit_input``: ``fn(x) -> x'`` replaces the first positional input (attribution's gates on FFN neurons);
- ``replace_output``: ``fn(out) -> out'`` (attribution's gates on linear units, tracing's restored states);
- ``add_output``: ``fn(x, out) -> delta``, the output becomes ``out + delta`` (the FAST stamp, LoRA);
- ``edit_experts``: ``fn(a) -> a'`` edits a fused MoE experts module's (N, E·I) routed activations, its output
  recomputed from them (:mod:`biaslab.models.experts`; attribution's gates on expert neurons).

Used by attribution (capture + gates), causal tracing (capture, noise, restore), the stamp and LoRA patches
(add), FAST's cached LM-head inputs (capture), and — through :func:`overwrite` — neuron pruning and weight patches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BiaslabError

KINDS = ("capture_input", "capture_output", "edit_input", "replace_output", "add_output", "edit_experts")


@dataclass(frozen=True)
class Intervention:
    name: str           # what it is, e.g. "attribution:model.layers.3.mlp.down_proj" (shown in errors)
    module: nn.Module
    kind: str
    fn: Callable

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BiaslabError(f"intervention {self.name}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")


def hidden(out):
    """The hidden states of a module output (the first entry of a tuple output)."""
    return out[0] if isinstance(out, tuple) else out


def with_hidden(out, h):
    """``out`` with its hidden states replaced by ``h`` (same container)."""
    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def _register(iv: Intervention):
    fn, kind = iv.fn, iv.kind
    if kind == "capture_input":
        return iv.module.register_forward_pre_hook(lambda m, args: fn(args[0]) and None)
    if kind == "edit_input":
        return iv.module.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))
    if kind == "capture_output":
        return iv.module.register_forward_hook(lambda m, args, out: fn(hidden(out)) and None)
    if kind == "edit_experts":
        from .models.experts import add_edit

        return add_edit(iv.name, iv.module, fn)
    if kind == "replace_output":
        return iv.module.register_forward_hook(lambda m, args, out: with_hidden(out, fn(hidden(out))))
    h = hidden  # add_output

    def add(m, args, out):
        o = h(out)
        return with_hidden(out, o + fn(args[0], o).to(o.dtype))
    return iv.module.register_forward_hook(add)


class Hooks:
    """Interventions registered on entry (or by :meth:`attach`) and all removed on exit / :meth:`remove`, also
    when registering one of them fails half-way."""

    def __init__(self, interventions: Sequence[Intervention]):
        self.interventions = list(interventions)
        self.handles: list = []

    def attach(self) -> "Hooks":
        try:
            for iv in self.interventions:
                self.handles.append(_register(iv))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()

    def ids(self) -> set[int]:
        return {h.id for h in self.handles}

    def __enter__(self) -> "Hooks":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def overwrite(changes: Sequence[tuple[torch.Tensor, object, torch.Tensor | float]]) -> Callable[[], None]:
    """Write ``value`` into ``param.data[index]`` for each (param, index, value) and return the undo that restores
    the saved originals bit for bit. Every change is validated (index in range, value broadcastable) before any
    parameter is touched, so a bad change leaves the model as it was."""
    saved = []
    for param, index, value in changes:
        try:
            old = param.data[index].clone()
            torch.broadcast_to(torch.as_tensor(value), old.shape)
        except (IndexError, RuntimeError) as e:
            raise BiaslabError(f"cannot write into a parameter of shape {tuple(param.shape)} at {index!r}: {e}") from None
        saved.append((param, index, old))
    with torch.no_grad():
        for param, index, value in changes:
            param.data[index] = torch.as_tensor(value).to(param.device, param.dtype) if torch.is_tensor(value) else value

    def undo():
        with torch.no_grad():
            for param, index, old in reversed(saved):
                param.data[index] = old
    return undo
