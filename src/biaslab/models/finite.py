"""Refusing NaN model outputs. A model run in half precision (float16 above all; T5 and Gemma are known cases)
can overflow inside, which turns its logits into NaN; a prediction, a log-likelihood or a greedy token taken from
them would be silently wrong, so scoring and generation stop with one line instead; a training loss that turns
NaN or infinite stops the training before the optimiser writes NaN into what it trains."""
from __future__ import annotations

import math

import torch

from ..errors import BiaslabError


def nan_error(spec: str, dtype: torch.dtype, what: str = "log-probabilities") -> BiaslabError:
    name = str(dtype).removeprefix("torch.")
    if dtype in (torch.float32, torch.float64):   # no overflow to escape: the weights themselves are bad
        return BiaslabError(f"model {spec!r} gave NaN {what} in {name}: its weights (or a patch on them) hold NaN or "
                            "inf values; check the checkpoint")
    instead = ("--dtype bfloat16 on a GPU that has it, or --dtype float32" if dtype == torch.float16
               else "--dtype float32")
    return BiaslabError(f"model {spec!r} gave NaN {what} in {name} (an overflow inside the model, or NaN/inf "
                        f"weights): rerun with {instead}")


def refuse_nan(lp: torch.Tensor, spec: str, dtype: torch.dtype, used=slice(None)) -> torch.Tensor:
    """``lp`` unchanged when it has no NaN at the ``used`` positions (the padding does not count)."""
    if lp[used].isnan().any():
        raise nan_error(spec, dtype)
    return lp


class NanGuard:
    """A ``generate`` logits processor that raises on NaN next-token scores (greedy search would pick token 0)."""

    def __init__(self, spec: str, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype

    @classmethod
    def processors(cls, spec: str, dtype: torch.dtype):
        """The guard as ``generate``'s ``logits_processor`` argument (it runs after generate's own processors)."""
        from transformers import LogitsProcessorList

        return LogitsProcessorList([cls(spec, dtype)])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.isnan().any():
            raise nan_error(self.spec, self.dtype, "next-token scores while generating")
        return scores


def refuse_bad_loss(loss: float, what: str, step: int, dtype: torch.dtype, lr_option: str = "the learning rate") -> float:
    """``loss`` unchanged when finite; else one line naming the training, the step and what to change."""
    if math.isfinite(loss):
        return loss
    half = dtype in (torch.float16, torch.bfloat16)
    raise BiaslabError(f"{what}: the training loss is {loss} at step {step} (model in "
                       f"{str(dtype).removeprefix('torch.')}): the training diverged; rerun with a lower {lr_option}"
                       + (" or --dtype float32" if half else ""))
