"""FFN neurons of a mixture-of-experts layer (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, DeepSeek-V2/V3): the fused
experts module of transformers ≥ 5, whose ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) hold every
expert's gated MLP.

Expert *e*'s neuron *i* is unit ``e·I + i`` of the layer's site (``E·I`` units). A token's activation at that unit
is the down projection's input, ``act(gate_e x) · (up_e x)``, for the experts the router sent it to, and 0 for the
others (an expert a token does not visit contributes nothing, so its neurons carry no attribution for that token).
Pruning unit ``e·I + i`` zeroes column *i* of ``down_proj[e]`` — the same as a dense FFN's down-projection column.

The fused module has no sub-module whose input is that activation, so attribution cannot gate it with a pre-hook
as on a dense FFN. :func:`add_edit` instead computes the module's output itself from its inputs (the hidden
states and the router's choice) with the activations passed through the caller's edit, in the order of
transformers' own eager loop. The model's own experts forward runs once per module, and its output is compared
with the recomputation, so a layout this code does not know is one clear error, never silently different
scores. Deviation from CRISPR (docs/methods/crispr.md): the paper's models are dense; on a MoE model the neurons
are per expert and only the routed tokens' activations enter their scores.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BiaslabError

INPUTS = ("hidden_states", "top_k_index", "top_k_weights")
_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # experts modules whose recomputation was checked
_CHAINS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()   # module -> edits, own forward


def fused_experts(module: nn.Module, where: str) -> tuple[int, int]:
    """(number of experts, neurons per expert) of a fused experts module in the layout this file recomputes;
    any other layout (biases, transposed or interleaved weights, no gate, a norm after each expert) is refused."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    layout_ok = (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
                 and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
                 and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
                 and not getattr(module, "has_post_expert_norm", False) and hasattr(module, "act_fn"))
    if layout_ok:
        e, h, i = down.shape
        layout_ok = tuple(gu.shape) == (e, 2 * i, h)
    if not layout_ok:
        raise BiaslabError(f"{where} ({type(module).__name__}) is not a fused experts module with gate_up_proj "
                           "(experts, 2·ffn, hidden) and down_proj (experts, hidden, ffn) and no biases; "
                           "CRISPR's MoE neuron sites support only that layout (Mixtral, Qwen-MoE, OLMoE, PhiMoE, "
                           "DeepSeek)")
    return int(down.shape[0]), int(down.shape[2])


def recompute(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              edit=None) -> torch.Tensor:
    """The experts' output for ``hidden`` (N, H) routed by ``top_k_index`` / ``top_k_weights`` (N, k), with the
    (N, E·I) routed activations passed through ``edit`` first (None: as they are)."""
    n_exp, width = int(module.down_proj.shape[0]), int(module.down_proj.shape[2])
    n = hidden.shape[0]
    routes = [torch.where(top_k_index == e) for e in range(n_exp)]   # (token rows, top-k slot) per expert
    rows = [r for r, _ in routes]
    acts = []
    for e, r in enumerate(rows):
        gate, up = F.linear(hidden[r], module.gate_up_proj[e]).chunk(2, dim=-1)
        acts.append(module.act_fn(gate) * up)
    all_rows = torch.cat(rows)
    all_exp = torch.cat([torch.full_like(r, e) for e, r in enumerate(rows)])
    act = hidden.new_zeros(n, n_exp, width).index_put((all_rows, all_exp), torch.cat(acts))
    if edit is not None:
        act = edit(act.reshape(n, n_exp * width)).reshape(n, n_exp, width)
    out = torch.zeros_like(hidden)
    for e, (r, slot) in enumerate(routes):
        if r.numel():
            y = F.linear(act[r, e], module.down_proj[e]) * top_k_weights[r, slot, None]
            out = out.index_add(0, r, y.to(out.dtype))
    return out


def _inputs(args: tuple, kwargs: dict) -> list:
    vals = list(args[:3]) + [kwargs[k] for k in INPUTS[len(args[:3]):] if k in kwargs]
    if len(vals) != 3:
        raise BiaslabError(f"the experts module was called with {len(args)} positional arguments and "
                           f"{sorted(kwargs)}; MoE neuron sites expect ({', '.join(INPUTS)})")
    return vals


def _check(name: str, module, hidden, idx, w, out) -> None:
    """The recomputation (unedited) must reproduce the model's own experts output (the caller runs it once per
    module)."""
    with torch.no_grad():
        plain = recompute(module, hidden, idx, w)
        scale = float(out.detach().abs().max().clamp(min=1e-6))
        err = float((plain - out.detach()).abs().max()) / scale
    tol = 1e-3 if out.dtype in (torch.float32, torch.float64) else 5e-2
    if err > tol:
        raise BiaslabError(f"{name}: recomputing the experts' output from their weights differs from the model's "
                           f"own by {err:.2g} of its scale (tolerance {tol:g}): this experts module does not compute "
                           "the gated MLP that MoE neuron sites assume")
    _CHECKED.add(module)


class _EditHandle:
    """One edit on a module's chain, removable like a torch hook handle; the last one removed gives the module its
    own forward back."""
    _next_id = 0

    def __init__(self, module, chain):
        _EditHandle._next_id += 1
        self.id, self.module, self.chain = -_EditHandle._next_id, module, chain

    def remove(self) -> None:
        chain = self.chain
        chain["edits"] = [(i, f) for i, f in chain["edits"] if i != self.id]
        if not chain["edits"] and chain.get("installed"):
            if chain["own"] is None:
                del self.module.forward        # back to the class's forward
            else:
                self.module.forward = chain["own"]
            chain["installed"] = False
            _CHAINS.pop(self.module, None)


def add_edit(name: str, module: nn.Module, fn) -> _EditHandle:
    """Edit ``module``'s routed activations with ``fn``. While edits are attached the module's forward is
    biaslab's recomputation with every edit applied in turn, in the order they were added (as pre-hooks on a
    dense FFN compose); the model's own experts forward then runs only once per module, for the check. (Two forward
    hooks that each recomputed from the inputs would undo each other, and the experts would run twice.) Torch hooks
    on the module still run around it; the instance's own ``forward`` (a wrapper, if any) is restored on removal."""
    chain = _CHAINS.setdefault(module, {"edits": [], "installed": False})
    handle = _EditHandle(module, chain)
    chain["edits"].append((handle.id, fn))
    if not chain["installed"]:
        own = module.__dict__.get("forward")
        plain = own if own is not None else module.forward   # bound before ours shadows it

        def forward(*args, **kwargs):
            hidden, idx, w = _inputs(args, kwargs)
            if module not in _CHECKED:   # without grad: a checkpointed layer's recomputation saves the same tensors
                with torch.no_grad():
                    own_out = plain(*args, **kwargs)
                _check(name, module, hidden, idx, w, own_out)
            fns = [f for _, f in chain["edits"]]

            def edit(a):
                for f in fns:
                    a = f(a)
                return a
            # a device map that names this module gives it an Accelerate wrapper that moves its inputs; this
            # forward stands in for it: the inputs go to the experts' device, the output comes back
            at, dev = hidden.device, module.down_proj.device
            return recompute(module, hidden.to(dev), idx.to(dev), w.to(dev), edit).to(at)
        chain.update(own=own, installed=True)
        module.forward = forward
    return handle
