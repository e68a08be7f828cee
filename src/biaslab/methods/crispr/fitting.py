"""CRISPR: bias neuron elimination (Yang et al., ACL 2024, arXiv 2311.09627; docs/methods/crispr.md).

For a labelled multiple-choice task posed under M synonymous instructions:

1. attribution ``A_i(ι,x,y) = h_i · ∂F(y|ι,x)/∂h_i`` per token position (:mod:`biaslab.attribution`, one forward
   and one backward pass per objective for every neuron of every layer at once);
2. biased output found automatically: ``ŷ = argmax_{c ≠ gold} P(c|ι,x)``, confusion score ``α = P(ŷ|ι,x)``
   (probabilities of the options' answer tokens soft-maxed over the full vocabulary);
3. skill disentanglement ``B_i = A_i(ŷ) − max(0, A_i(gold))`` (each A first reduced over token positions);
4. token max → confusion-weighted instance aggregate ``(1/N) Σ_j α_j · B_i(x_j)`` → mean over the M
   instructions (→ mean over ``trials`` dev samples);
5. all neurons of all layers ranked together; the top n are pruned (a :class:`NeuronMaskPatch`).

**Gradient convention** (named ``logp-alpha``, the default): the objective is F = log P and both terms are
weighted by the detached α, as in the released code. Since ``α·∂logP(ŷ)/∂h = ∂P(ŷ)/∂h``, the bias term equals
the paper's A computed on P *without* a second α; the skill term is ``α·h·∂logP(gold)/∂h``. ``objective="prob"``
gives ``p-alpha`` (the paper's formula read literally: A on P, then weighted by α again).

Ablations (the paper's Table): ``reduce="mean"`` (mean instead of max over tokens), ``confusion_weighting=False``
(α ≡ 1), ``skill_disentanglement=False`` (B = A(ŷ)).

Choosing n: a fixed ``neurons`` or golden-section search on dev accuracy over n ∈ [0, 500] (released code:
interval shrunk to width ≤ 4, then every remaining n tried; ties go to the smaller n). Deviation: n = 0 (the
unpruned model) is always evaluated too and wins unless some n beats it on dev. Optional deviation
``search_objective="accuracy+goldprob"``: dev accuracy with ties broken by the mean option-normalised gold
probability (:func:`search_objective_value`), for models whose dev accuracy is flat in n.

Deviations (named in the patch params): scored by the option letters' next-token probabilities (protocol
``letter``), or by the next-token probability of each option's first word after a plain-text completion prompt
(protocol ``cloze``), rather than greedy generation + exact match (see :mod:`biaslab.tasks`); sites default to FFN intermediate neurons
(``sites="linear"`` is the released code's reading); instance aggregate is the mean (the paper's sum divided
by N, as the code does — the ranking is the same); the search may evaluate a seeded subset of the dev split
(``search_dev_limit``) to fit CPU budgets.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import attribution as attr
from ... import distributed as D
from ...errors import BiaslabError
from ...patches import NeuronMaskPatch
from ...tasks import MCItem, protocol_id, score_mc
from .config import METHOD_ID, CrisprConfig, fit_settings, resolve_instructions
from .scores import trial_scores
from .selection import check_task_items, choose_n, ids_hash, sample_items, search_objective_value, split_dev_test, top_units

SEARCH_CHUNK = 64   # dev items per scoring call of the search (and per shard under torch.distributed)


def _scoring_deviation(protocol: str) -> str:
    if protocol == "generation":   # the released code's evaluation; only its biased-output reading differs
        return ("evaluated by greedy generation + exact match (tasks.generation.v1, as the released code); the biased "
                "output attributed is the option of highest log-likelihood, not the generated text")
    what = {"letter": "letter-probability", "cloze": "cloze (first option-word token, plain-text prompt)",
            "option-loglik": "option log-likelihood"}.get(protocol, protocol)
    return f"{what} scoring ({protocol_id(protocol)}) instead of generation + exact match"


def make_patch(lm, units: dict[str, list[int]], cfg: CrisprConfig, *, provenance: dict, extra: dict | None = None) -> NeuronMaskPatch:
    params = {"method": METHOD_ID, "convention": cfg.convention, **fit_settings(cfg),
              "n_neurons": sum(len(v) for v in units.values()),
              "deviations": [_scoring_deviation(cfg.protocol),
                             f"sites={cfg.sites} ({'FFN intermediate neurons' if cfg.sites == 'ffn' else 'every linear output unit, as the released code'})",
                             "instance aggregate = mean (paper's sum / N)"]
              + (["n search: dev accuracy with ties broken by the mean option-normalised gold probability"]
                 if cfg.search and cfg.search_objective == "accuracy+goldprob" else [])
              + (["n search: harmonic mean of dev accuracy on ambiguous and on disambiguated BBQ items"]
                 if cfg.search and cfg.search_objective == "condition-hmean" else [])
              + ([f"n search also tries every n in 1..{cfg.search_small} on dev"]
                 if cfg.search and cfg.search_small else []), **(extra or {})}
    return NeuronMaskPatch.from_units(lm, units, sites=cfg.sites, params=params, provenance=provenance)


@dataclass
class CrisprFit:
    patch: NeuronMaskPatch
    scores: dict[str, torch.Tensor]
    n: int
    search: dict[int, float] | None
    trials: list[dict]
    dev: list[MCItem]
    test: list[MCItem]


def fit_details(lm, items: Sequence[MCItem], cfg: CrisprConfig | None = None, *, task: str = "custom",
                scores: dict[str, torch.Tensor] | None = None, trials_info: list[dict] | None = None,
                search_cache: dict[int, float] | None = None, on_search_step=None) -> CrisprFit:
    """Split, attribute on dev samples, choose n (fixed or golden-section search on the dev objective
    ``cfg.search_objective``, dev accuracy by default), build the patch.
    Test items are never seen. ``scores`` / ``search_cache`` let a resumed run skip finished work."""
    cfg = resolve_instructions((cfg or CrisprConfig(neurons=10)).validate(), items)
    check_task_items(items, task, cfg.instructions)
    if cfg.search and cfg.search_objective == "condition-hmean":
        conds = {it.meta.get("context_condition") for it in items}
        if not {"ambig", "disambig"} <= conds:
            raise BiaslabError(f"--search-objective condition-hmean needs BBQ items with both ambiguous and "
                               f"disambiguated contexts; task {task!r} has context_condition values "
                               f"{sorted(map(str, conds))}")
    dev, test = split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    if scores is None:
        scores, trials_info = trial_scores(lm, dev, cfg)
    search = None
    if cfg.search:
        search_items = sample_items(dev, cfg.search_dev_limit, cfg.split_seed)
        instr = list(range(cfg.instructions))
        cache = dict(search_cache or {})
        ranking = attr.rank_neurons(scores, cfg.search_max)

        def dev_acc(n: int) -> float:
            if n in cache:
                return cache[n]
            units: dict[str, list[int]] = defaultdict(list)
            for name, u, _ in ranking[:n]:
                units[name].append(u)
            p = NeuronMaskPatch.from_units(lm, dict(units), sites=cfg.sites)
            label = f"dev search n={n}"
            with p.applied(lm):   # chunks of 64 items: the same in one process and, sharded, in several
                recs = D.sharded_map(lambda part: score_mc(lm, part, instr, protocol=cfg.protocol, desc=label),
                                     search_items, SEARCH_CHUNK, desc=label, per_item=len(instr), enabled=lm.progress)
            cache[n] = search_objective_value(recs, cfg.search_objective)
            if on_search_step:
                on_search_step(n, cache[n], cache)
            return cache[n]

        n, search = choose_n(dev_acc, cfg)
        search_ids = ids_hash(search_items)
    else:
        n, search_ids = cfg.neurons, None
    units = top_units(scores, n)
    prov = {"task": task, "n_items": len(items), "dev_fraction": cfg.dev_fraction, "split_seed": cfg.split_seed,
            "dev_ids_hash": ids_hash(dev), "test_ids_hash": ids_hash(test), "n_dev": len(dev), "n_test": len(test),
            "trials": trials_info or [], "search_dev_ids_hash": search_ids,
            "instructions": list(range(cfg.instructions))}
    extra = {"chosen_n": n, "search": {str(k): v for k, v in sorted(search.items())} if search else None}
    patch = make_patch(lm, units, cfg, provenance=prov, extra=extra)
    return CrisprFit(patch, scores, n, search, trials_info or [], dev, test)


def fit(lm, data, config: CrisprConfig | dict | None = None) -> NeuronMaskPatch:
    """Fit only (no evaluation): ``data`` is a task spec (``sst2``, ``bbq:Age``) or a list of :class:`MCItem`;
    ``config`` a :class:`CrisprConfig` or a dict of its fields. The whole loop is
    ``biaslab.evaluation.run_mitigation("crispr", ...)``."""
    from ...task_specs import load_task

    if isinstance(config, dict):
        config = CrisprConfig(**config)
    if isinstance(data, str):
        task, items = load_task(data)
    else:
        task, items = "custom", list(data)
    return fit_details(lm, items, config, task=task).patch

