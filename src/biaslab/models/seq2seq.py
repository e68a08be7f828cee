"""Seq2SeqLanguageModel: the scoring primitives on a T5-style encoder-decoder (the CRISPR paper's Flan-T5 / T0).

The prompt is the encoder's input; an answer is what the decoder emits after its start token.

- ``next_token_logprobs``: log P(candidate's first token) at the decoder's first position (the letter protocol).
- ``loglikelihood``: log P(continuation | context) under teacher forcing. This is the sum of the continuation's
  token log-probabilities with no length normalisation, padding ignored, as the released CRISPR code scores options.
  The continuation ends with the tokenizer's end-of-sequence token, so it is the probability of answering
  exactly that text.
- ``generate``: batched greedy decoding.

Sequences are run in length-sorted padded batches (no prefix packing: the encoder is bidirectional). Sentence
likelihood without a context (CrowS-Pairs, StereoSet) has no encoder-decoder reading and is refused in one line.
"""
from __future__ import annotations

import torch

from ..errors import BiaslabError
from ..progress import progress_bar
from .finite import NanGuard
from .head import _upcast, float32_head
from .lm import ContinuationScore, LanguageModel

SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "umt5")


class Seq2SeqLanguageModel(LanguageModel):
    is_seq2seq = True

    def __init__(self, model, tokenizer, **kw):
        kw["packing"] = False
        kw["chat_template"] = False   # T5 checkpoints have no chat template; the prompt is the encoder's input
        super().__init__(model, tokenizer, **kw)
        self.use_chat_template = False
        start = getattr(model.config, "decoder_start_token_id", None)
        self.start_id = start if start is not None else self.pad_id
        self.eos_id = tokenizer.eos_token_id

    def render(self, user: str, *, system: str | None = None, assistant_prefix: str = "", cue: str | None = None) -> str:
        """The encoder's input: the text itself (no chat template, no answer cue: the decoder starts the answer)."""
        return (system + "\n\n" if system else "") + user + assistant_prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids   # the tokenizer's own special tokens (T5: a final </s>)

    def scoring_mode(self) -> str:
        return "seq2seq-padded"

    def target_ids(self, text: str) -> list[int]:
        """A decoder target: the text's tokens (leading space dropped), then end-of-sequence."""
        ids = self.tokenizer(text.strip(), add_special_tokens=False).input_ids
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    def split_context(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(encoder input ids, decoder target ids); their concatenation is what the attribution pass splits back."""
        if not context.strip():
            raise BiaslabError(f"{type(self.model).__name__} is an encoder-decoder: it scores an answer given an input, "
                               "not a sentence alone (CrowS-Pairs / StereoSet sentence likelihoods); this benchmark "
                               "needs a decoder-only model")
        return self.encode(context), self.target_ids(continuation)

    def candidate_token_id(self, text: str) -> int:
        ids = self.tokenizer(text.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"candidate {text!r} encodes to no tokens")
        return ids[0]

    def decoder_forward(self, enc: list[list[int]], dec_in: list[list[int]]):
        """Logits (B, Td, V), float32, of a padded batch; encoder and decoder right-padded with their masks."""
        ids, mask, _, _ = self.pad(enc, side="right")
        dids, dmask, _, _ = self.pad(dec_in, side="right")
        with float32_head(self.model.get_output_embeddings()):   # bf16 logits tie options (models.lm.float32_head)
            out = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dids, decoder_attention_mask=dmask,
                             use_cache=False)
        return _upcast(out.logits), mask, dmask

    def _decoder_scores(self, enc, targets, desc):
        """Yield (i, (T_i, V) log-softmax at the positions predicting targets[i]) under teacher forcing."""
        with progress_bar(len(enc), desc, enabled=self.progress) as advance:
            for batch in self._batches([len(enc[i]) + len(targets[i]) for i in range(len(enc))]):
                dec_in = [[self.start_id] + targets[i][:-1] for i in batch]
                logits, _, _ = self.decoder_forward([enc[i] for i in batch], dec_in)
                used = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)   # not the padding
                for k, i in enumerate(batch):
                    used[k, :len(targets[i])] = True
                lp = self._log_softmax(logits, used)
                for k, i in enumerate(batch):
                    yield i, lp[k, :len(targets[i])]
                advance(len(batch))

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[str], candidates, *, desc: str = "scoring") -> list[list[float]]:
        if candidates and isinstance(candidates[0], str):
            candidates = [candidates] * len(prompts)
        enc = [self.encode(p) for p in prompts]
        cand_ids = [[self.candidate_token_id(c) for c in cs] for cs in candidates]
        out: list[list[float]] = [None] * len(prompts)  # type: ignore[list-item]
        for i, lp in self._decoder_scores(enc, [[0]] * len(enc), desc):
            out[i] = lp[0, cand_ids[i]].cpu().tolist()
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]], *, desc: str = "log-likelihood",
                      max_length: int | None = None) -> list[ContinuationScore]:
        pieces = [self.split_context(c, x) for c, x in requests]
        for i, (_, cont) in enumerate(pieces):
            if not cont:
                raise ValueError(f"request {i}: the continuation {requests[i][1]!r} has no tokens")
        enc = [ctx[-max_length:] if max_length else ctx for ctx, _ in pieces]
        out: list[ContinuationScore] = [None] * len(requests)  # type: ignore[list-item]
        for i, lp in self._decoder_scores(enc, [c for _, c in pieces], desc):
            target = torch.tensor(pieces[i][1], device=lp.device)
            tok = lp.gather(1, target[:, None])[:, 0]
            out[i] = ContinuationScore(float(tok.sum()), len(target), bool((lp.argmax(-1) == target).all()),
                                       tok.cpu().tolist(), list(pieces[i][1]))
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, desc: str = "generating") -> list[str]:
        enc = [self.encode(p) for p in prompts]
        out: list[str] = [None] * len(prompts)  # type: ignore[list-item]
        with progress_bar(len(prompts), desc, enabled=self.progress) as advance:
            for batch in self._batches([len(e) + max_new_tokens for e in enc]):
                ids, mask, _, _ = self.pad([enc[i] for i in batch], side="right")
                with float32_head(self.model.get_output_embeddings()):   # greedy picks need untied logits
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                              do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                              decoder_start_token_id=self.start_id, temperature=None, top_p=None,
                                              top_k=None, logits_processor=NanGuard.processors(self.spec, self.dtype),
                                              **({"eos_token_id": self.eos_id} if self.eos_id is not None else {}))
                for k, i in enumerate(batch):
                    out[i] = self.tokenizer.decode(gen[k], skip_special_tokens=True).strip()
                advance(len(batch))
        return out


def require_decoder_only(lm, what: str) -> None:
    """One clear line where a verb needs a decoder-only model."""
    if getattr(lm, "is_seq2seq", False):
        raise BiaslabError(f"{what} needs a decoder-only model; {lm.spec} is an encoder-decoder "
                           f"({type(lm.model).__name__}), which biaslab supports for crispr and the multiple-choice "
                           "audits (docs/SUPPORT.md)")
