"""Rewriting with the SR_LLM prompt (greedy, optionally under a LoRA patch) and the per-pair records the rewrite
metrics (:mod:`biaslab.metrics.rewrite`) are computed from."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import BiaslabError
from ...patches import Patch
from .lora import build_prompt

REWRITE_CHUNK = 64   # texts per chunk of `biaslab rewrite` (the unit shared between ranks)


@dataclass
class RewriteOutput:
    rewrites: list[str]
    notices: list[str]
    max_new_tokens: list[int]


def rewrite(lm, texts: list[str], *, patch: Patch | None = None, max_input_tokens: int = 256,
            max_new_cap: int = 256, on_long: str = "truncate", desc: str = "rewriting") -> RewriteOutput:
    """Greedy rewrites of ``texts`` with the SR_LLM prompt (optionally under ``patch``).

    max_new_tokens per text = min(max_new_cap, 1.5 × input tokens + 16 rounded up to a multiple of 16). Empty text →
    error. A text longer than ``max_input_tokens`` is cut to that many tokens with a notice (``on_long="error"``
    raises instead)."""
    prepared, notices, limits = _prepare(lm, texts, max_input_tokens, max_new_cap, on_long)
    with _applied(lm, patch):
        out = _generate(lm, prepared, limits, desc)
    return RewriteOutput(out, notices, limits)


def rewrite_shared(lm, texts: list[str], *, patch: Patch | None = None, max_input_tokens: int = 256,
                   max_new_cap: int = 256, desc: str = "rewriting", chunk: int = REWRITE_CHUNK,
                   run=None) -> RewriteOutput:
    """:func:`rewrite` for ``biaslab rewrite``, through the runner's chunk loop (:func:`biaslab.runs.score_journaled`):
    the texts in fixed chunks of ``chunk``, each finished chunk journaled in ``run`` (a :class:`~biaslab.runs.RunDir`;
    a rerun resumes; :func:`biaslab.evaluation.rewrite_run.run_rewrite` opens one) and shared by the ranks of a
    torch.distributed launch (chunk k on rank k mod world, gathered on every rank), so one process and N write the
    same rewrites (each chunk is generated in the same batches either way). Texts are checked and cut on every rank
    before any generation, so a bad text fails every rank at once."""
    from ...runs import score_journaled

    prepared, notices, limits = _prepare(lm, texts, max_input_tokens, max_new_cap, "truncate")
    items = [{"index": i, "text": t, "limit": n} for i, (t, n) in enumerate(zip(prepared, limits))]

    def score(part):
        gens = _generate(lm, [it["text"] for it in part], [it["limit"] for it in part], desc)
        return [{"index": it["index"], "input": texts[it["index"]], "rewrite": g} for it, g in zip(part, gens)]

    with _applied(lm, patch):
        recs = score_journaled(run, desc, items, chunk, score)
    if [r["index"] for r in recs] != list(range(len(texts))):   # the run's args pin the texts: a damaged journal
        raise BiaslabError(f"{run.journal if run else 'the rewrites'} do not cover texts 1-{len(texts)} once each, in "
                           "order; move the run directory away and rerun")
    return RewriteOutput([r["rewrite"] for r in recs], notices, limits)


def rewrite_lines(texts: list[str], rewrites: list[str]) -> str:
    """The JSON lines ``{input, rewrite}`` of ``--output`` and of a run's ``rewrites.jsonl``."""
    import json

    return "".join(json.dumps({"input": t, "rewrite": r}) + "\n" for t, r in zip(texts, rewrites))


def _prepare(lm, texts: list[str], max_input_tokens: int, max_new_cap: int, on_long: str):
    """The whitespace-normalised texts (cut to ``max_input_tokens``), the notices for cut texts, and each text's
    max_new_tokens rounded up to a 16-token bucket."""
    if on_long not in ("truncate", "error"):
        raise BiaslabError(f"on_long must be 'truncate' or 'error', got {on_long!r}")
    if not texts:
        raise BiaslabError("no text to rewrite")
    prepared, notices, limits = [], [], []
    for i, t in enumerate(texts):
        if t is None or not str(t).strip():
            raise BiaslabError(f"text {i + 1} is empty: nothing to rewrite")
        t = " ".join(str(t).split())
        ids = lm.tokenizer(t, add_special_tokens=False).input_ids
        if len(ids) > max_input_tokens:
            msg = (f"text {i + 1} has {len(ids)} tokens, over the limit of {max_input_tokens} "
                   "(--max-input-tokens)")
            if on_long == "error":
                raise BiaslabError(msg)
            notices.append(msg + f"; only its first {max_input_tokens} tokens were rewritten")
            ids = ids[:max_input_tokens]
            t = lm.tokenizer.decode(ids)
        prepared.append(t)
        limits.append(min(max_new_cap, 16 * math.ceil((int(1.5 * len(ids)) + 16) / 16)))
    return prepared, notices, limits


def _applied(lm, patch: Patch | None):
    import contextlib

    return patch.applied(lm) if patch is not None else contextlib.nullcontext()


def _generate(lm, prepared: list[str], limits: list[int], desc: str) -> list[str]:
    """One greedy generate call per 16-token bucket of length limits."""
    out: list[str] = [""] * len(prepared)
    buckets: dict[int, list[int]] = {}
    for i, lim in enumerate(limits):
        buckets.setdefault(lim, []).append(i)
    for lim, idx in sorted(buckets.items()):
        gens = lm.generate([build_prompt(lm, prepared[i]) for i in idx], max_new_tokens=lim, desc=desc)
        for i, g in zip(idx, gens):
            out[i] = g
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_rewriter(lm, pairs, *, patch: Patch | None = None, embedder=None, max_new_cap: int = 192,
                      desc: str = "rewriting") -> list[dict]:
    """Per-pair records (id, source, dimension, biased, reference, rewrite, cosine) for the rewrite metrics."""
    out = rewrite(lm, [p.biased for p in pairs], patch=patch, max_new_cap=max_new_cap, desc=desc)
    recs = [{"id": p.id, "source": p.source, "dimension": p.dimension, "biased": p.biased, "reference": p.neutral,
             "rewrite": r} for p, r in zip(pairs, out.rewrites)]
    return with_cosines(recs, embedder)


def with_cosines(recs: list[dict], embedder=None) -> list[dict]:
    if embedder is not None:
        for r, c in zip(recs, embedder.cosines([r["biased"] for r in recs], [r["rewrite"] for r in recs])):
            r["cosine"] = c
    return recs
