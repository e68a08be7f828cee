"""The LM head: its logits in float32 on a half-precision model (:func:`float32_head`), the step some models apply
after it (:func:`after_head`), and whether logits may be taken by running the head on the wanted positions only
(:func:`head_split_matches`)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import lru_cache

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least (half/bfloat16 upcast; a float64 model keeps float64 for exact gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


HEAD_BLOCK = 1 << 25   # 32 M elements: 128 MB of float32 weights converted at a time (a 128 k × 8 k head: 32 blocks)


@contextmanager
def float32_head(head):
    """Inside: the LM head module's output is formed in float32 on a bf16/fp16 model, outside autograd, from its
    half-precision input and weights (the weights converted a block of rows at a time). Rounded to bf16, logits sit
    on a grid of 1/16–1/4 nat, where 16 % of BBQ letter items tied between two options and went to the first
    (experiments/score/bf16_ties.md). The head still runs as a module, so every hook on it applies (a calibration
    patch adds to its output, FAST captures its input): a forward hook put first replaces the half-precision
    output. Under autograd (attribution) the head runs as it is."""
    w = getattr(head, "weight", None)
    if (w is None or w.dtype not in (torch.float16, torch.bfloat16) or torch.is_grad_enabled()
            or not isinstance(head, torch.nn.Linear) or w.device.type == "meta"):
        yield
        return

    def in_float32(mod, args, out):
        x = args[0].to(w.device).float()
        rows = max(1, HEAD_BLOCK // max(w.shape[1], 1))   # ≤ HEAD_BLOCK float32 elements of weights at a time
        full = torch.cat([x @ w[i:i + rows].float().T for i in range(0, w.shape[0], rows)], dim=-1)
        return (full if mod.bias is None else full + mod.bias.float()).to(out.device)

    hook = head.register_forward_hook(in_float32, prepend=True)
    try:
        yield
    finally:
        hook.remove()


def after_head(model):
    """The elementwise step the model applies to its head's output, as its own forward does, or None: Gemma 2's
    final soft-cap (``cap · tanh(z / cap)``, ``final_logit_softcapping``), Cohere's ``logit_scale`` (a product),
    Granite's ``logits_scaling`` (a quotient). Applied to the float32 head output, so these models' logits are
    float32 too; :func:`head_split_matches` checks the result against the model's own logits, and a model that
    does something else after its head is scored through its own forward."""
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(cap, (int, float)) and cap > 0:
        return lambda z: torch.tanh(z / cap) * cap
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return lambda z: z * scale
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 0:
        return lambda z: z / divisor
    return None


def head_logits(head, picked: torch.Tensor, after=None) -> torch.Tensor:
    """The LM head's logits (float32) at the picked positions (:func:`float32_head`), with the model's step after
    its head (:func:`after_head`) applied in float32."""
    with float32_head(head):
        z = _upcast(head(picked))
    return z if after is None else after(z)


@lru_cache(maxsize=None)
def _takes_logits_to_keep(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def wanted_columns(model, cols: torch.Tensor) -> tuple[dict, torch.Tensor, int]:
    """For the model's own forward (the head split off): the keyword that makes it compute the logits of the
    wanted columns only (``logits_to_keep`` as the sorted unique columns, a CPU index, which serves hidden states
    on any device), each wanted column's index among those it keeps, and how many it keeps — or no keyword, the
    columns themselves, and −1 where its forward does not take one. A forward that ignored the keyword returns
    every column: compare its logits' length with the count."""
    if not _takes_logits_to_keep(type(model)):
        return {}, cols, -1
    keep, at = torch.unique(cols, return_inverse=True)
    return {"logits_to_keep": keep.cpu()}, at, len(keep)


def logits_agree(ref: torch.Tensor, got: torch.Tensor, dtype) -> bool:
    """Whether two logit tensors of one shape are the same up to the rounding of a ``dtype`` model (relative to the
    largest reference logit)."""
    tol = 1e-3 if ref.dtype == torch.float64 or dtype in (torch.float32, torch.float64) else 2e-2
    return ref.shape == got.shape and bool((ref - got).abs().max() <= tol * (ref.abs().max() + 1e-3))


def head_split_matches(lm) -> bool:
    """The head on the body's last hidden state, then the model's known step after it (:func:`after_head`), gives
    the model's own logits. Without that step the split silently dropped Cohere's ``logit_scale`` and Granite's
    ``logits_scaling`` (0.46 and 0.49 max |Δ logit| on tiny random models); a model that does anything else
    after its head fails the check and is scored through its own forward. A check that cannot run (e.g. weights
    on the meta device) leaves the split on."""
    m = lm.model
    head = m.get_output_embeddings()
    if getattr(m, "base_model", m) is m or head is None or getattr(m.config, "is_encoder_decoder", False):
        return False
    try:
        emb = m.get_input_embeddings().weight
        ids = torch.tensor([[t % emb.shape[0] for t in (lm.prefix_id or 0, 5, 17, 29, 41)]], device=emb.device)
        with torch.no_grad():
            ref = _upcast(m(input_ids=ids, use_cache=False).logits[0, -1])
            out = m.base_model(input_ids=ids, use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            got = head_logits(head, hidden[0, -1], after_head(m)).to(ref.device)
        return logits_agree(ref, got, lm.dtype)
    except Exception:  # noqa: BLE001 - e.g. meta weights: keep the split
        return True
