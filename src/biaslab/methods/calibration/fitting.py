"""Content-free probabilities of the answer tokens (the calibration's fit).

* **CC** (Zhao et al. 2021): the item's text is replaced by each content-free input ("N/A", "", "[MASK]"),
  the label distribution is read at the answer position, and the distributions are averaged.
* **DC** (Fei et al. 2023): the content-free inputs are random words of the task's own domain — ``dc_samples``
  strings of as many words as an average item text, drawn from the dev split's texts.

Deviation, stated: the paper calibrates one prompt (with demonstrations); here every instruction paraphrase the
task uses is averaged into one content-free distribution, and the item's text is its ``context`` (the question
and the options stay), with a dev item as the template for the rest."""
from __future__ import annotations

import random
from dataclasses import replace

from ...errors import BiaslabError
from ...tasks import MCItem, answer_targets, answer_token_ids, prompt_text, protocol_context

DEVIATION = ("the paper calibrates one prompt; here every instruction paraphrase the task uses is averaged into one "
             "content-free label distribution, and the item's text (its context) is what the content-free input "
             "replaces, a dev item being the template for the question and options")


def label_tokens(lm, items: list[MCItem], protocol: str) -> list[int]:
    """The answer token ids shared by every item (a calibration corrects a fixed label set)."""
    with protocol_context(lm, protocol):
        sets = {tuple(answer_token_ids(lm, it, protocol)) for it in items}
    if len(sets) != 1:
        raise BiaslabError(f"calibration needs the same answer tokens for every item, but under --protocol {protocol} "
                           f"this task has {len(sets)} different sets (item-specific option texts); use --protocol "
                           "letter")
    return list(next(iter(sets)))


def domain_words(items: list[MCItem]) -> tuple[list[str], int]:
    words = [w for it in items for w in (it.context or it.question).split()]
    if not words:
        raise BiaslabError("domain-context calibration needs item texts to sample words from; this task has none")
    mean_len = max(1, round(len(words) / len(items)))
    return words, mean_len


def content_free_inputs(kind: str, dev: list[MCItem], cfg) -> list[str]:
    if kind == "cc":
        return list(cfg.content_free)
    words, n = domain_words(dev)
    rng = random.Random(cfg.dc_seed)
    return [" ".join(rng.choice(words) for _ in range(n)) for _ in range(cfg.dc_samples)]


def content_free_probs(lm, kind: str, dev: list[MCItem], cfg, instructions: list[int]) -> tuple[list[int], list[float], list[str]]:
    """(label token ids, p_cf averaged over inputs × instructions, the inputs used)."""
    import math

    tokens = label_tokens(lm, dev, cfg.protocol)
    template = dev[0]
    inputs = content_free_inputs(kind, dev, cfg)
    prompts = []
    with protocol_context(lm, cfg.protocol):
        for text in inputs:
            item = replace(template, context=text) if template.context else replace(template, question=text)
            for i in instructions:
                prompts.append(prompt_text(lm, item, i, protocol=cfg.protocol))
        cand = answer_targets(lm, template, cfg.protocol)   # their first tokens are ``tokens``
        lps = lm.next_token_logprobs(prompts, [cand] * len(prompts), desc=f"{kind} content-free inputs")
    # the label distribution of each prompt, renormalised over the labels, then averaged (Zhao et al., eq. 2)
    acc = [0.0] * len(tokens)
    for lp in lps:
        z = max(lp)
        e = [math.exp(x - z) for x in lp]
        s = sum(e)
        for k, v in enumerate(e):
            acc[k] += v / s
    return tokens, [a / len(lps) for a in acc], inputs
