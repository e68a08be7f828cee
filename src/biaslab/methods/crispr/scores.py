"""CRISPR attribution (docs/methods/crispr.md, steps 1–4): activation × gradient of the biased and the gold option
for every neuron at once, confusion-weighted and skill-disentangled, averaged over instances and instructions."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ... import attribution as attr
from ...progress import progress_bar
from ...tasks import LETTERS, MCItem, answer_targets, answer_token_ids, prompt_text, protocol_context
from .config import CrisprConfig
from .selection import ids_hash, sample_items

@dataclass
class AttributionStats:
    n_instances: int = 0
    biased_option_counts: Counter = field(default_factory=Counter)  # ŷ as option index
    mean_confusion: float = 0.0
    dev_accuracy: float = 0.0

    def to_dict(self) -> dict:
        return {"n_instances": self.n_instances, "mean_confusion": self.mean_confusion,
                "dev_accuracy_letter": self.dev_accuracy,
                "biased_option_share": {LETTERS[k]: v / max(1, self.n_instances)
                                        for k, v in sorted(self.biased_option_counts.items())}}


def bias_scores(lm, items: Sequence[MCItem], instructions: Sequence[int], cfg: CrisprConfig, *,
                sites=None, desc: str = "CRISPR attribution") -> tuple[dict[str, torch.Tensor], AttributionStats]:
    """CRISPR bias scores {site: (n_units,)} over ``items`` × ``instructions`` (mean over instructions).

    Under ``letter`` / ``cloze`` an option is one answer token at the prompt's last position; under
    ``option-loglik`` it is the option's text, P(option) is the probability of that whole continuation (the
    released code's "argmax of option sequence probability" scoring mode), and the attribution pass runs on
    prompt + option, one pass for the biased option and one for the gold one. With ``cfg.layers_per_pass`` each
    attribution batch runs one pass per group of layers (:func:`~biaslab.attribution.site_groups`); the option
    scores and the biased-option choice are made once per batch."""
    site_list = attr.resolve_sites(lm, sites or cfg.sites)
    total = {s.name: torch.zeros(s.n_units, dtype=torch.float64) for s in site_list}
    st = AttributionStats()
    conf_sum, correct = 0.0, 0
    batch_fn = _continuation_batches if cfg.protocol in ("option-loglik", "generation") else _answer_token_batches
    from ... import distributed as D

    with progress_bar(len(items) * len(instructions), D.shared_label(desc)) as advance:
        for i in instructions:
            per_instr = {s.name: torch.zeros(s.n_units, dtype=torch.float64) for s in site_list}
            # one contribution per attribution batch, summed in batch order: under torch.distributed each rank
            # computes the batches it owns (k mod world) and the contributions are gathered, so every rank — and
            # one process — adds the same numbers in the same order
            owned = _owner()
            for batch, yhat, pred, conf, contrib in _sharded(batch_fn(lm, site_list, items, i, cfg, owned), cfg,
                                                             advance):
                for k, j in enumerate(batch):
                    st.biased_option_counts[yhat[k]] += 1
                    correct += int(pred[k] == items[j].gold)
                conf_sum += conf
                for n in per_instr:
                    per_instr[n] += contrib[n]
            for n in total:
                total[n] += per_instr[n] / len(items)
    for n in total:
        total[n] /= len(instructions)
    st.n_instances = len(items) * len(instructions)
    st.mean_confusion = conf_sum / max(1, st.n_instances)
    st.dev_accuracy = correct / max(1, st.n_instances)
    return {n: v.float() for n, v in total.items()}, st


def _contribution(cfg: CrisprConfig, alpha, a_bias, a_skill) -> dict[str, torch.Tensor]:
    """One batch's confusion-weighted, skill-disentangled attribution sum per site (float64)."""
    w = torch.tensor(alpha if cfg.confusion_weighting else [1.0] * len(alpha), dtype=torch.float64)[:, None]
    out = {}
    for n in a_bias:
        b = a_bias[n].double()
        if a_skill is not None:
            b = b - a_skill[n].double().clamp(min=0)
        out[n] = (w * b).sum(0).cpu()
    return out


def _owner():
    """Which attribution batches this process computes: all in one process, k ≡ rank (mod world) otherwise."""
    from ... import distributed as D

    W, me = D.world_size(), D.rank()
    return lambda k: W == 1 or k % W == me


def _sharded(batches, cfg: CrisprConfig, advance):
    """(batch, ŷ, prediction, Σ confusion, contribution) per attribution batch, in batch order. In one process
    every batch is computed; under torch.distributed rank r computes the batches k ≡ r (mod world) — the batch
    generator skips the others' passes — and each round of ``world`` batches is all-gathered."""
    from ... import distributed as D

    W = D.world_size()
    mine, n = None, 0
    for k, batch, yhat, alpha, pred, a_bias, a_skill in batches:
        n = k + 1
        if yhat is not None:
            mine = (k, batch, list(yhat), list(pred), sum(alpha), _contribution(cfg, alpha, a_bias, a_skill))
        if W == 1:
            advance(len(batch))
            yield mine[1:]
        elif k % W == W - 1:
            yield from _gather_round(mine, advance)
            mine = None
    if W > 1 and n % W:            # the last, partial round (every rank saw the same n batches)
        yield from _gather_round(mine, advance)


def _gather_round(mine, advance):
    from ... import distributed as D

    for got in sorted((g for g in D.all_gather(mine) if g is not None), key=lambda g: g[0]):
        advance(len(got[1]))
        yield got[1:]


def _biased_option(scores: Sequence[float], gold: int) -> tuple[int, int]:
    """(most probable wrong option, predicted option) from per-option scores; ties go to the lower index."""
    wrong = [c for c in range(len(scores)) if c != gold]
    return (max(wrong, key=lambda c: (scores[c], -c)), max(range(len(scores)), key=lambda c: (scores[c], -c)))


def _answer_token_batches(lm, site_list, items, i: int, cfg: CrisprConfig, owned=lambda k: True):
    """Attribution batches under a single-answer-token protocol: one pass per batch; the biased and the gold
    objectives are two backward passes through it. Yields (k, batch, ŷ, α, prediction, a_bias, a_skill); a batch
    this process does not own (``owned(k)`` false) is yielded as (k, batch, None, …) without its passes."""
    with protocol_context(lm, cfg.protocol):
        seqs = [lm.encode(prompt_text(lm, it, i, protocol=cfg.protocol)) for it in items]
        cands = [answer_token_ids(lm, it, cfg.protocol) for it in items]
    groups = attr.site_groups(site_list, cfg.layers_per_pass)
    for k_batch, batch in enumerate(attr.token_batches(lm, seqs, cfg.token_budget)):
        if not owned(k_batch):
            yield k_batch, batch, None, None, None, None, None
            continue
        a_bias, a_skill = {}, ({} if cfg.skill_disentanglement else None)
        for g, group in enumerate(groups):   # the forward values do not depend on the hooked sites
            with attr.attribution_pass(lm, group, [seqs[j] for j in batch], span=cfg.span, reduce=cfg.reduce,
                                       checkpoint_layers=cfg.checkpoint_layers) as ap:
                if g == 0:
                    with torch.no_grad():
                        opt_lp = [ap.logprobs[k, cands[j]].detach() for k, j in enumerate(batch)]
                    yhat, pred = zip(*(_biased_option([float(x) for x in opt_lp[k]], items[j].gold)
                                       for k, j in enumerate(batch)))
                    alpha = [float(opt_lp[k][y].exp()) for k, y in enumerate(yhat)]
                a_bias.update(ap.attribute(ap.objective([cands[j][y] for j, y in zip(batch, yhat)], cfg.objective),
                                           retain_graph=cfg.skill_disentanglement))
                if cfg.skill_disentanglement:
                    a_skill.update(ap.attribute(ap.objective([cands[j][items[j].gold] for j in batch], cfg.objective),
                                                retain_graph=False))
        yield k_batch, batch, list(yhat), alpha, list(pred), a_bias, a_skill


def _continuation_batches(lm, site_list, items, i: int, cfg: CrisprConfig, owned=lambda k: True):
    """Attribution batches under ``option-loglik``: every option's log-likelihood from the scoring engine (no
    gradient), then prompt + biased option and prompt + gold option through their own attribution passes."""
    prompts = [prompt_text(lm, it, i, protocol=cfg.protocol) for it in items]
    targets = [answer_targets(lm, it, cfg.protocol) for it in items]
    reqs = [(p, t) for p, ts in zip(prompts, targets) for t in ts]
    ll = iter(lm.loglikelihood(reqs, desc="option log-likelihoods"))
    scores = [[next(ll).logprob for _ in ts] for ts in targets]
    choice = [_biased_option(sc, it.gold) for sc, it in zip(scores, items)]
    # (context, continuation) token ids of each item's biased and gold options, tokenised once
    parts = {(j, c): lm.split_context(prompts[j], targets[j][c])
             for j, (y, _) in enumerate(choice) for c in {y, items[j].gold}}
    longer = [max((parts[j, y][0] + parts[j, y][1], parts[j, it.gold][0] + parts[j, it.gold][1]), key=len)
              for j, ((y, _), it) in enumerate(zip(choice, items))]
    groups = attr.site_groups(site_list, cfg.layers_per_pass)
    for k_batch, batch in enumerate(attr.token_batches(lm, longer, cfg.token_budget)):
        if not owned(k_batch):
            yield k_batch, batch, None, None, None, None, None
            continue
        yhat = [choice[j][0] for j in batch]
        alpha = [math.exp(scores[j][y]) for j, y in zip(batch, yhat)]

        def attribute(options):
            pp = [parts[j, c] for j, c in zip(batch, options)]
            out = {}
            for group in groups:
                with attr.attribution_pass(lm, group, [a + b for a, b in pp], span=cfg.span, reduce=cfg.reduce,
                                           checkpoint_layers=cfg.checkpoint_layers,
                                           continuation=[len(b) for _, b in pp]) as ap:
                    out.update(ap.attribute(ap.objective(None, cfg.objective), retain_graph=False))
            return out

        a_bias = attribute(yhat)
        a_skill = attribute([items[j].gold for j in batch]) if cfg.skill_disentanglement else None
        yield k_batch, batch, yhat, alpha, [choice[j][1] for j in batch], a_bias, a_skill


def trial_scores(lm, dev: Sequence[MCItem], cfg: CrisprConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Mean of :func:`bias_scores` over ``cfg.trials`` seeded samples of ``cfg.dev_size`` dev items."""
    instructions = list(range(cfg.instructions))
    acc, info = None, []
    for t in range(cfg.trials):
        sample = sample_items(dev, cfg.dev_size, cfg.trial_seed + t) if cfg.dev_size < len(dev) else list(dev)
        sc, st = bias_scores(lm, sample, instructions, cfg, desc=f"CRISPR attribution (trial {t + 1}/{cfg.trials})")
        info.append({"trial": t, "seed": cfg.trial_seed + t, "ids_hash": ids_hash(sample), **st.to_dict()})
        acc = sc if acc is None else {n: acc[n] + sc[n] for n in acc}
    return {n: v / cfg.trials for n, v in acc.items()}, info

