"""The two generation protocols of the multiple-choice tasks (:func:`biaslab.tasks.score_mc`): greedy answers of at
most :data:`biaslab.tasks.GENERATE_TOKENS` tokens, matched to an option afterwards.

- ``generate`` (``tasks.generate.v1``, BBQ's ``bbq.generate.v1``): options listed with letters; the answer is cut at
  its first line break and read as the BBQ authors' analysis reads it (:func:`biaslab.answers.match_option`: a
  letter, the option's text, an "unknown" paraphrase). An answer that names no option has ``pred`` None and is
  **left out** of the metrics (the authors drop it; ``unmatched_rate`` counts it).
- ``generation`` (``tasks.generation.v1``): the released CRISPR code's default evaluation. Options listed as text
  (the ``option-loglik`` layout); the answer's whitespace and periods stripped and lower-cased, then matched
  **exactly** to an option treated the same way. An answer that matches none is **wrong**: ``pred`` None with
  ``no_match: "wrong"``, so accuracy counts it as an error. The bias scores leave it out, because it names no one.
"""
from __future__ import annotations


def generate_pairs(lm, pairs, prompts: list[str], desc: str, protocol: str, max_new_tokens: int) -> list[dict]:
    """Records of (item, instruction) ``pairs`` from greedy answers to their ``prompts``."""
    from .answers import match_option, match_option_exact

    texts = lm.generate(prompts, max_new_tokens=max_new_tokens, desc=desc)
    out = []
    for (it, i), text in zip(pairs, texts):
        if protocol == "generation":
            answer = text.strip()
            pred = match_option_exact(answer, it.options)
            extra = {"no_match": "wrong"} if pred is None else {}
        else:
            answer = text.split("\n")[0].strip()
            pred = match_option(answer, it.options, unknown=it.meta.get("unknown"))
            extra = {}
        out.append({"id": it.id, "instruction": i, "answer": answer, "pred": pred, "matched": pred is not None,
                    "gold": it.gold, "correct": int(pred == it.gold), **extra, **it.meta})
    return out
