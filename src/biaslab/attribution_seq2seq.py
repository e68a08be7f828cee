"""Activation × gradient on a T5-style encoder-decoder (the CRISPR paper's Flan-T5 / T0 setting).

The same interface as :class:`biaslab.attribution.AttributionPass` (``objective``, ``attribute``, ``logprobs``). Each
token sequence is split at its continuation: the first ``len − c`` tokens are the encoder's input and the last ``c``
are the decoder's targets under teacher forcing. With no continuation the whole sequence is the input, and the
answer is the decoder's first token.

Reductions follow the released code. A site's positions are those its activations live on: the input tokens for
encoder sites and for the decoder's cross-attention keys and values, which read the encoder's states; the answer
positions for every other decoder site. Only ``span="all"`` exists here, because the encoder/decoder split is
itself the span.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .attribution_core import PassMethods, check_options
from .errors import BiaslabError


def on_input_positions(site_name: str) -> bool:
    """Whether a T5 site's activations are indexed by input (encoder) tokens."""
    return site_name.startswith("encoder.") or site_name.endswith(("EncDecAttention.k", "EncDecAttention.v"))


class Seq2SeqAttributionPass(PassMethods):
    def __init__(self, lm, sites, seqs: list[list[int]], *, span: str = "all", reduce: str = "max",
                 gates: dict[str, float] | None = None, continuation: Sequence[int] | None = None,
                 checkpoint_layers: bool = False):
        check_options(span=span, reduce=reduce)
        self.checkpoint_layers = checkpoint_layers
        if span != "all":
            raise BiaslabError("on an encoder-decoder the attribution span is fixed by the architecture: encoder sites "
                               "over the input tokens, decoder sites over the answer tokens (the released code); use "
                               "--span all")
        if not seqs or any(len(s) == 0 for s in seqs):
            raise BiaslabError("attribution needs at least one non-empty token sequence")
        c = list(continuation) if continuation is not None else [0] * len(seqs)
        if len(c) != len(seqs) or any(not 0 <= k < len(s) for k, s in zip(c, seqs)):
            raise BiaslabError("each continuation must be shorter than its sequence: an input must precede it")
        self.lm, self.sites, self.seqs, self.reduce, self.gates = lm, sites, seqs, reduce, gates
        self.continuation = continuation
        self._n_backward = 0
        self.enc = [s[:len(s) - k] for s, k in zip(seqs, c)]
        self.targets = [s[len(s) - k:] for s, k in zip(seqs, c)]

    def __enter__(self):
        lm = self.lm
        dec_in = [[lm.start_id] + t[:-1] if t else [lm.start_id] for t in self.targets]
        logits, emask, dmask = self.hooked_forward(lambda: lm.decoder_forward(self.enc, dec_in))
        n = [max(len(t), 1) for t in self.targets]
        self.rows = torch.tensor([k for k, m in enumerate(n) for _ in range(m)], device=logits.device)
        self.cols = torch.tensor([j for m in n for j in range(m)], device=logits.device)
        self.logprobs = torch.log_softmax(logits[self.rows, self.cols], dim=-1)
        if self.continuation is None:   # one answer position per row: the decoder's first
            self.rows = torch.arange(len(self.seqs), device=logits.device)
        else:
            nxt = torch.tensor([t for ts in self.targets for t in ts], device=logits.device)
            tok = self.logprobs[torch.arange(len(nxt), device=nxt.device), nxt]
            self.continuation_logprob = torch.zeros(len(self.seqs), dtype=tok.dtype, device=tok.device).index_add(
                0, self.rows, tok)
        answer = torch.zeros_like(dmask, dtype=torch.bool)
        answer[torch.repeat_interleave(torch.arange(len(n), device=dmask.device), torch.tensor(n, device=dmask.device)),
               torch.tensor([j for m in n for j in range(m)], device=dmask.device)] = True
        self.masks = {"input": emask.bool(), "answer": answer}
        self.pmask = answer
        return self

    def site_mask(self, name: str) -> torch.Tensor:
        return self.masks["input" if on_input_positions(name) else "answer"]
