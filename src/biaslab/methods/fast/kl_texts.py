"""The texts of FAST's knowledge-keeping KL terms (docs/methods/fast.md): L_s1 on same-subject prompts, L_s2 on
WikiText-2 windows, each with the *original* model's LM-head inputs cached, from which the original logits are
rebuilt at every step (the head, then the model's own step after it: models.head.after_head)."""
from __future__ import annotations

import random

import torch

from ...errors import BiaslabError
from ...interventions import Hooks, Intervention
from ...models.head import head_logits, logits_agree
from .config import FastConfig
from .pairs import SUBJECT_TEMPLATES, KnowledgePair


def wiki_windows(lm, *, split: str = "valid", n: int, tokens: int, seed: int) -> list[str]:
    """``n`` WikiText-2 (raw) paragraphs of ≥ ``tokens`` tokens, cut to ``tokens`` tokens, seeded choice."""
    from ...data import data_path

    path = data_path("wikitext2", f"{split}.raw.txt")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("=")]
    rng = random.Random(f"wiki:{seed}")
    rng.shuffle(lines)
    out = []
    for ln in lines:
        ids = lm.tokenizer(ln, add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            out.append(lm.tokenizer.decode(ids[:tokens]))
        if len(out) >= n:
            break
    return out


def subject_prompts(pairs: list[KnowledgePair], *, n: int, seed: int) -> list[str]:
    terms = sorted({p.prompt_1[p.span_1[0]:p.span_1[1]].strip() for p in pairs} |
                   {p.prompt_2[p.span_2[0]:p.span_2[1]].strip() for p in pairs})
    all_ = [t.format(x=term) for term in terms for t in SUBJECT_TEMPLATES]
    random.Random(f"subj:{seed}").shuffle(all_)
    return all_[:n]


class _TextSet:
    """Texts for a KL term, with the original model's LM-head inputs cached at every scored position."""

    def __init__(self, lm, texts: list[str]):
        self.lm = lm
        self.seqs = [lm.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        self.seqs = [([lm.prefix_id] + s) if lm.prefix_id is not None else s for s in self.seqs]
        self.seqs = [s for s in self.seqs if len(s) >= 2]
        self.cache: list[torch.Tensor] = []
        head = lm.model.get_output_embeddings()
        store = []
        hook = Hooks([Intervention("fast:lm-head-inputs", head, "capture_input", lambda x: store.append(x.detach()))]).attach()
        try:
            with torch.no_grad():
                for b in range(0, len(self.seqs), 16):
                    chunk = self.seqs[b:b + 16]
                    store.clear()
                    got = self._logits(chunk)
                    h = store[-1]
                    if h.dim() == 3:  # the head ran on the model's own forward (no head split): keep the scored ones
                        ids, mask, pos, offs = self.lm.pad(chunk, side="right")   # right-padded: columns 0..len-1
                        h = h[[k for k, s in enumerate(chunk) for _ in s], [offs[k] + j for k, s in enumerate(chunk) for j in range(len(s))]]
                    self._check_rebuilt(got, h)
                    k = 0
                    for s in chunk:  # rows come out text by text, position by position
                        self.cache.append(h[k:k + len(s)].clone())
                        k += len(s)
        finally:
            hook.remove()

    def _orig_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The original model's logits (float32) from its cached head inputs: the head, then the model's own step
        after it (models.head.after_head)."""
        return head_logits(self.lm.model.get_output_embeddings(), h, self.lm.after_head)

    def _check_rebuilt(self, got: torch.Tensor, h: torch.Tensor) -> None:
        """The KL terms rebuild the original logits from the head's inputs; a model that changes its head's output
        in a way biaslab does not know would make them compare two different distributions: refuse it."""
        if not logits_agree(got, self._orig_logits(h).to(got.device), self.lm.dtype):
            raise BiaslabError(f"FAST: model '{self.lm.spec}' changes its LM head's output in a way biaslab cannot "
                               "rebuild from the head's inputs (not a known soft-cap or logit scale), so the KL "
                               "terms L_s1/L_s2 would compare different distributions; FAST does not support it")

    def _logits(self, seqs):
        ids, mask, pos, offs = self.lm.pad(seqs, side="right")
        rows = [k for k, s in enumerate(seqs) for _ in range(len(s))]
        cols = [offs[k] + j for k, s in enumerate(seqs) for j in range(len(s))]
        dev = ids.device
        return self.lm.logits_at(ids, mask, pos, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))

    def _kl_rows(self, idx: list[int]) -> torch.Tensor:
        """KL(P_orig ‖ P_current) at every position of texts ``idx`` (differentiable)."""
        seqs = [self.seqs[i] for i in idx]
        cur = torch.log_softmax(self._logits(seqs), -1)
        with torch.no_grad():
            orig = torch.log_softmax(self._orig_logits(torch.cat([self.cache[i] for i in idx])), -1)
        return (orig.exp() * (orig - cur)).sum(-1)

    def kl(self, idx: list[int]) -> torch.Tensor:
        """Mean over positions of KL(P_orig ‖ P_current) for texts ``idx`` (differentiable)."""
        return self._kl_rows(idx).mean()

    def kl_sum(self, idx: list[int]) -> torch.Tensor:
        """The sum over positions of the same KL: a part of a step shared across processes."""
        return self._kl_rows(idx).sum()

    def positions(self, idx: list[int]) -> int:
        return sum(len(self.seqs[i]) for i in idx)


def make_kl_sets(lm, pairs: list[KnowledgePair], cfg: FastConfig) -> dict:
    """The L_s1 / L_s2 texts with the *original* model's outputs cached: build them before any edit, and share
    them between FAST and its baselines."""
    return {"subject": _TextSet(lm, subject_prompts(pairs, n=cfg.n_subject_prompts, seed=cfg.seed)),
            "text": _TextSet(lm, wiki_windows(lm, n=cfg.n_text, tokens=cfg.text_tokens, seed=cfg.seed))}
