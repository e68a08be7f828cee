"""CRISPR: bias neuron elimination (Yang et al., ACL 2024, arXiv 2311.09627; METHODS.md §1).

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

import hashlib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import attribution as attr
from ..errors import BiaslabError, UnknownNameError
from ..patches import NeuronMaskPatch
from ..progress import progress_bar
from ..tasks import (INSTRUCTIONS, LETTERS, PROTOCOL_LAYOUTS, MCItem, answer_targets, answer_token_ids, prompt_text,
                     protocol_context, protocol_id, score_mc)

GOLDEN_RATIO = (5 ** 0.5 - 1) / 2
METHOD_ID = "crispr.v1"
CONVENTIONS = {"logprob": "logp-alpha", "prob": "p-alpha"}
SEARCH_OBJECTIVES = ("accuracy", "accuracy+goldprob", "condition-hmean")
ATTRIBUTION_PROTOCOLS = ("letter", "cloze", "option-loglik")   # tasks.py; option-loglik: whole option texts
# prompt layout of biaslab.tasks.render_mc's letter protocol (v2: instruction after the item, commit 9ea39bb); part of
# every attribution cache key (the config in the key names the protocol), so runs made with another layout are never reused
PROMPT_LAYOUT = PROTOCOL_LAYOUTS["letter"]


@dataclass
class CrisprConfig:
    sites: str = "ffn"                    # "ffn" | "linear"
    instructions: int | None = 10         # the first M instructions; None → all the task's (resolve_instructions)
    protocol: str = "letter"              # attribution needs one answer position: letter | cloze (tasks.py)
    span: str = "all"                     # positions reduced over: all | prompt | answer
    reduce: str = "max"                   # max (paper) | mean (ablation)
    objective: str = "logprob"            # logprob → convention logp-alpha (code); prob → p-alpha (paper literal)
    confusion_weighting: bool = True
    skill_disentanglement: bool = True
    dev_fraction: float = 0.1
    split_seed: int = 0
    dev_size: int = 20                    # dev instances sampled per attribution trial
    trials: int = 1
    trial_seed: int = 0                   # trial t samples with seed trial_seed + t
    neurons: int | None = None            # fixed n; None with search=False → error
    search: bool = False
    search_max: int = 500
    search_tol: int = 4
    search_dev_limit: int | None = None   # dev items scored per search step (None: the whole dev split)
    search_objective: str = "accuracy"    # accuracy (released code) | accuracy+goldprob (tie-break, a deviation)
                                          # | condition-hmean (BBQ: harmonic mean of ambig/disambig accuracy, a deviation)
    search_small: int = 0                 # also try every n in 1..K on dev (a deviation; guards against plateaus)
    token_budget: int = 1024

    def validate(self) -> "CrisprConfig":
        from ..models.sites import SITE_KINDS

        if self.sites not in SITE_KINDS:
            raise UnknownNameError("site kind", self.sites, SITE_KINDS)
        # the upper bound is the task's own count (ten generic ones, or a task file's header): check_task_items
        if self.instructions is not None and (isinstance(self.instructions, bool) or not isinstance(self.instructions, int)
                                              or self.instructions < 1):
            raise BiaslabError(f"--instructions must be a positive number of instructions, got {self.instructions!r}")
        if self.protocol not in ATTRIBUTION_PROTOCOLS:
            raise BiaslabError("CRISPR attribution supports the task protocols "
                               f"{', '.join(map(repr, ATTRIBUTION_PROTOCOLS))} (got {self.protocol!r})")
        attr.check_options(span=self.span, reduce=self.reduce, objective=self.objective)
        if self.reduce == "sum":
            raise BiaslabError("CRISPR reduces token positions by 'max' (paper) or 'mean' (ablation), not 'sum'")
        if not 0 < self.dev_fraction < 1:
            raise BiaslabError(f"dev fraction must be in (0, 1), got {self.dev_fraction}")
        if self.dev_size < 1 or self.trials < 1:
            raise BiaslabError("--dev-size and --trials must be at least 1")
        if self.neurons is None and not self.search:
            raise BiaslabError("choose the number of neurons: --neurons N or --search")
        if self.neurons is not None and self.search:
            raise BiaslabError("--neurons and --search are exclusive")
        if self.neurons is not None and self.neurons < 0:
            raise BiaslabError(f"--neurons must be ≥ 0, got {self.neurons}")
        if self.search_objective not in SEARCH_OBJECTIVES:
            raise UnknownNameError("search objective", self.search_objective, SEARCH_OBJECTIVES)
        if self.search_small < 0:
            raise BiaslabError(f"--search-small must be ≥ 0, got {self.search_small}")
        if self.search and (self.search_max < 1 or self.search_tol < 1):
            raise BiaslabError("search bounds: --search-max and the tolerance must be ≥ 1")
        return self

    @property
    def convention(self) -> str:
        return CONVENTIONS[self.objective]


def resolve_instructions(cfg: CrisprConfig, items: Sequence[MCItem]) -> CrisprConfig:
    """``cfg`` with ``instructions=None`` replaced by the task's own count (ten generic ones, or a task file's)."""
    from dataclasses import replace

    from ..tasks import task_instruction_count

    return cfg if cfg.instructions is not None else replace(cfg, instructions=task_instruction_count(items))


# ---------------------------------------------------------------- data splits
def check_task_items(items: Sequence[MCItem], name: str = "task", instructions: int | None = None) -> None:
    """Refuse a task CRISPR cannot fit: no items, too few / too many options, or fewer instructions than
    ``instructions`` (a task file's header may give fewer than the ten generic ones)."""
    from ..tasks import task_instruction_count

    if not items:
        raise BiaslabError(f"{name} has no items")
    if instructions is not None and instructions > (avail := task_instruction_count(items)):
        raise BiaslabError(f"--instructions {instructions} asks for more instructions than task {name} has "
                           f"({avail}); use --instructions 1-{avail}")
    for it in items:
        if len(it.options) < 2:  # MCItem already refuses this; kept for duck-typed items
            raise BiaslabError(f"{name} item {it.id}: CRISPR needs at least 2 options (a wrong one to attribute)")
        if len(it.options) > len(LETTERS):
            raise BiaslabError(f"{name} item {it.id}: at most {len(LETTERS)} options are supported, got {len(it.options)}")


def split_dev_test(items: Sequence[MCItem], *, dev_fraction: float = 0.1, seed: int = 0) -> tuple[list[MCItem], list[MCItem]]:
    """Seeded split: ``ceil(dev_fraction·N)`` dev items, the rest test (both in the original order)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_dev = max(1, math.ceil(dev_fraction * len(items)))
    if n_dev >= len(items):
        raise BiaslabError(f"a task of {len(items)} items is too small for a dev/test split")
    dev = set(idx[:n_dev])
    return [it for i, it in enumerate(items) if i in dev], [it for i, it in enumerate(items) if i not in dev]


def strata_key(it: MCItem) -> tuple:
    m = it.meta
    return (m.get("category", ""), m.get("context_condition", ""), m.get("question_polarity", ""), it.gold if not m.get("category") else "")


def sample_items(items: Sequence[MCItem], n: int | None, seed: int) -> list[MCItem]:
    """Deterministic stratified sample (round-robin over strata: label for SST-2; category × context condition
    × polarity for BBQ), returned in the original order. ``None`` or n ≥ len keeps all."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise BiaslabError(f"sample size must be positive, got {n}")
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        buckets[strata_key(it)].append(i)
    rng = random.Random(seed)
    keys = sorted(buckets)
    for k in keys:
        rng.shuffle(buckets[k])
    chosen, depth = [], 0
    while len(chosen) < n:
        for k in keys:
            if depth < len(buckets[k]) and len(chosen) < n:
                chosen.append(buckets[k][depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def ids_hash(items: Sequence[MCItem]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- attribution
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
    prompt + option, one pass for the biased option and one for the gold one."""
    site_list = attr.resolve_sites(lm, sites or cfg.sites)
    total = {s.name: torch.zeros(s.n_units, dtype=torch.float64) for s in site_list}
    st = AttributionStats()
    conf_sum, correct = 0.0, 0
    batch_fn = _continuation_batches if cfg.protocol == "option-loglik" else _answer_token_batches
    with progress_bar(len(items) * len(instructions), desc) as advance:
        for i in instructions:
            per_instr = {s.name: torch.zeros(s.n_units, dtype=torch.float64) for s in site_list}
            for batch, yhat, alpha, pred, a_bias, a_skill in batch_fn(lm, site_list, items, i, cfg):
                for k, j in enumerate(batch):
                    st.biased_option_counts[yhat[k]] += 1
                    correct += int(pred[k] == items[j].gold)
                conf_sum += sum(alpha)
                w = torch.tensor(alpha if cfg.confusion_weighting else [1.0] * len(batch), dtype=torch.float64)[:, None]
                for n in per_instr:
                    b = a_bias[n].double()
                    if a_skill is not None:
                        b = b - a_skill[n].double().clamp(min=0)
                    per_instr[n] += (w * b).sum(0)
                advance(len(batch))
            for n in total:
                total[n] += per_instr[n] / len(items)
    for n in total:
        total[n] /= len(instructions)
    st.n_instances = len(items) * len(instructions)
    st.mean_confusion = conf_sum / max(1, st.n_instances)
    st.dev_accuracy = correct / max(1, st.n_instances)
    return {n: v.float() for n, v in total.items()}, st


def _biased_option(scores: Sequence[float], gold: int) -> tuple[int, int]:
    """(most probable wrong option, predicted option) from per-option scores; ties go to the lower index."""
    wrong = [c for c in range(len(scores)) if c != gold]
    return (max(wrong, key=lambda c: (scores[c], -c)), max(range(len(scores)), key=lambda c: (scores[c], -c)))


def _answer_token_batches(lm, site_list, items, i: int, cfg: CrisprConfig):
    """Attribution batches under a single-answer-token protocol: one pass per batch; the biased and the gold
    objectives are two backward passes through it."""
    with protocol_context(lm, cfg.protocol):
        seqs = [lm.encode(prompt_text(lm, it, i, protocol=cfg.protocol)) for it in items]
        cands = [answer_token_ids(lm, it, cfg.protocol) for it in items]
    for batch in attr.token_batches(lm, seqs, cfg.token_budget):
        with attr.AttributionPass(lm, site_list, [seqs[j] for j in batch], span=cfg.span, reduce=cfg.reduce) as ap:
            with torch.no_grad():
                opt_lp = [ap.logprobs[k, cands[j]].detach() for k, j in enumerate(batch)]
            yhat, pred = zip(*(_biased_option([float(x) for x in opt_lp[k]], items[j].gold) for k, j in enumerate(batch)))
            alpha = [float(opt_lp[k][y].exp()) for k, y in enumerate(yhat)]
            a_bias = ap.attribute(ap.objective([cands[j][y] for j, y in zip(batch, yhat)], cfg.objective),
                                  retain_graph=cfg.skill_disentanglement)
            a_skill = (ap.attribute(ap.objective([cands[j][items[j].gold] for j in batch], cfg.objective),
                                    retain_graph=False) if cfg.skill_disentanglement else None)
        yield batch, list(yhat), alpha, list(pred), a_bias, a_skill


def _continuation_batches(lm, site_list, items, i: int, cfg: CrisprConfig):
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
    for batch in attr.token_batches(lm, longer, cfg.token_budget):
        yhat = [choice[j][0] for j in batch]
        alpha = [math.exp(scores[j][y]) for j, y in zip(batch, yhat)]

        def attribute(options):
            pp = [parts[j, c] for j, c in zip(batch, options)]
            with attr.AttributionPass(lm, site_list, [a + b for a, b in pp], span=cfg.span, reduce=cfg.reduce,
                                      continuation=[len(b) for _, b in pp]) as ap:
                return ap.attribute(ap.objective(None, cfg.objective), retain_graph=False)

        a_bias = attribute(yhat)
        a_skill = attribute([items[j].gold for j in batch]) if cfg.skill_disentanglement else None
        yield batch, yhat, alpha, [choice[j][1] for j in batch], a_bias, a_skill


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


# ---------------------------------------------------------------- selection
def top_units(scores: dict[str, torch.Tensor], n: int) -> dict[str, list[int]]:
    """The top-n neurons over all sites, as {site: sorted unit indices}."""
    out: dict[str, list[int]] = defaultdict(list)
    for name, unit, _ in attr.rank_neurons(scores, n):
        out[name].append(unit)
    return {k: sorted(v) for k, v in out.items()}


def random_units(site_sizes: dict[str, int], counts: dict[str, int], seed: int,
                 exclude: dict[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The random control: for each site, as many uniformly random units as ``counts`` names there (site-matched),
    never one of ``exclude`` (CRISPR's own units: a control that drew them would be CRISPR, which happened once
    with a 1-neuron patch, p = 1/1536). The first ``k`` non-excluded units of a seeded permutation, so a draw that
    hits no excluded unit is the same as without ``exclude``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(counts):
        k = counts[name]
        if k:
            skip = set((exclude or {}).get(name, ()))
            if site_sizes[name] - len(skip) < k:
                raise BiaslabError(f"site {name}: cannot draw {k} control units outside the {len(skip)} excluded "
                                   f"of its {site_sizes[name]}")
            perm = [u for u in torch.randperm(site_sizes[name], generator=g).tolist() if u not in skip]
            out[name] = sorted(perm[:k])
    return out


def golden_section_search(f: Callable[[int], float], lo: int = 0, hi: int = 500, tol: int = 4) -> tuple[int, dict[int, float]]:
    """Maximise an integer function by golden-section search (released CRISPR code): shrink [lo, hi] until its
    width ≤ tol, then try every remaining n. Every value is computed once (cached). Returns (best n, {n: f(n)});
    ties go to the smaller n."""
    if tol < 1:
        raise BiaslabError(f"search tolerance must be ≥ 1 (else the search cannot terminate), got {tol}")
    if hi < lo:
        raise BiaslabError(f"empty search interval [{lo}, {hi}]")
    cache: dict[int, float] = {}

    def F(n: int) -> float:
        if n not in cache:
            cache[n] = float(f(n))
        return cache[n]

    while hi - lo > tol:
        c = hi - round((hi - lo) * GOLDEN_RATIO)
        d = lo + round((hi - lo) * GOLDEN_RATIO)
        if F(c) < F(d):
            lo = c
        else:
            hi = d
    for n in range(lo, hi + 1):
        F(n)
    best = max(cache, key=lambda n: (cache[n] if not math.isnan(cache[n]) else -math.inf, -n))
    return best, cache


def choose_n(f: Callable[[int], float], cfg: CrisprConfig) -> tuple[int, dict[int, float]]:
    """The n search of ``cfg``: golden-section search of ``f`` (the dev objective) over [0, search_max], then the
    unpruned model (n = 0, always: prune only if it helps on dev) and, with ``search_small = K``, every n in 1..K
    (a deviation: golden-section search assumes a unimodal objective, and on a plateau — every large n giving the
    same constant answer — a one-record difference can steer it away from a peak at small n, as happened on SST-2
    with 10 instructions). Best value wins; ties go to the smaller n. Returns (n, {n: f(n)})."""
    n, search = golden_section_search(f, 0, cfg.search_max, cfg.search_tol)
    extra = [k for k in [0, *range(1, min(cfg.search_small, cfg.search_max) + 1)] if k not in search]
    for k in extra:
        search[k] = float(f(k))
    if extra:
        n = max(search, key=lambda k: (search[k] if not math.isnan(search[k]) else -math.inf, -k))
    return n, search


def accuracy_mean(records: Sequence[dict]) -> float:
    """Accuracy averaged over instructions (the paper's mean accuracy)."""
    by: dict = defaultdict(list)
    for r in records:
        by[r.get("instruction", 0)].append(r["correct"])
    vals = [sum(v) / len(v) for v in by.values() if v]
    return sum(vals) / len(vals) if vals else math.nan


def gold_prob_mean(records: Sequence[dict]) -> float:
    """Mean over instructions of the mean option-normalised probability of the gold option (the expected accuracy
    of answering by sampling from the option distribution)."""
    by: dict = defaultdict(list)
    for r in records:
        lp = r["logprobs"]
        m = max(lp)
        z = sum(math.exp(x - m) for x in lp)
        by[r.get("instruction", 0)].append(math.exp(lp[r["gold"]] - m) / z)
    vals = [sum(v) / len(v) for v in by.values() if v]
    return sum(vals) / len(vals) if vals else math.nan


def condition_hmean(records: Sequence[dict]) -> float:
    """Mean over instructions of the harmonic mean of the accuracies on BBQ's ambiguous and disambiguated items
    (a named deviation from the released code's dev accuracy, for the ``condition-hmean`` search objective).

    On BBQ the gold answer of every ambiguous item is "unknown" and of no disambiguated item, so answering
    "unknown" to everything scores accuracy ≈ 0.5 — the collapse that pruning hundreds of neurons produces
    (experiments/crispr/results.md, BBQ-Age option-loglik). The harmonic mean of the two conditions' accuracies
    is 0 for that collapse and rewards fixing ambiguous answers only while disambiguated answers stay right."""
    by: dict = defaultdict(lambda: {"ambig": [], "disambig": []})
    for r in records:
        cond = r.get("context_condition")
        if cond in ("ambig", "disambig"):
            by[r.get("instruction", 0)][cond].append(r["correct"])
    vals = []
    for k, d in sorted(by.items()):
        if not d["ambig"] or not d["disambig"]:
            continue
        a, b = sum(d["ambig"]) / len(d["ambig"]), sum(d["disambig"]) / len(d["disambig"])
        vals.append(0.0 if a + b == 0 else 2 * a * b / (a + b))
    if not vals:
        raise BiaslabError("search objective condition-hmean needs BBQ items with both ambiguous and disambiguated "
                           "contexts (records with context_condition 'ambig' and 'disambig'); these records have "
                           f"{sorted({str(r.get('context_condition')) for r in records})}")
    return sum(vals) / len(vals)


def search_objective_value(records: Sequence[dict], objective: str = "accuracy") -> float:
    """The dev objective the n search maximises.

    ``accuracy``: mean accuracy over instructions (the released code). ``accuracy+goldprob`` (a named deviation):
    the same accuracy with ties broken by :func:`gold_prob_mean` — ``acc + goldprob / (K + 1)`` with K the number
    of (item, instruction) records. When every instruction has the same items, accuracy is a multiple of 1/K and
    goldprob ∈ [0, 1], so the order is lexicographic: a higher dev accuracy always wins, and the gold probability
    only decides between equal accuracies (e.g. a model that answers one label for every item, where dev accuracy
    is flat in n)."""
    if objective not in SEARCH_OBJECTIVES:
        raise UnknownNameError("search objective", objective, SEARCH_OBJECTIVES)
    if objective == "condition-hmean":
        return condition_hmean(records)
    acc = accuracy_mean(records)
    if objective == "accuracy":
        return acc
    return acc + gold_prob_mean(records) / (len(records) + 1)


def make_patch(lm, units: dict[str, list[int]], cfg: CrisprConfig, *, provenance: dict, extra: dict | None = None) -> NeuronMaskPatch:
    params = {"method": METHOD_ID, "convention": cfg.convention, **asdict(cfg),
              "n_neurons": sum(len(v) for v in units.values()),
              "deviations": [("letter-probability" if cfg.protocol == "letter" else
                              "cloze (first option-word token, plain-text prompt)")
                             + f" scoring ({protocol_id(cfg.protocol)}) instead of generation + exact match",
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
            with p.applied(lm):
                recs = score_mc(lm, search_items, instr, protocol=cfg.protocol, desc=f"dev search n={n}")
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
    """The mitigation entry point (``MITIGATIONS['crispr']``): ``data`` is a task spec (``sst2``, ``bbq:Age``)
    or a list of :class:`MCItem`; ``config`` a :class:`CrisprConfig` or a dict of its fields."""
    from ..tasks import load_task

    if isinstance(config, dict):
        config = CrisprConfig(**config)
    if isinstance(data, str):
        task, items = load_task(data)
    else:
        task, items = "custom", list(data)
    return fit_details(lm, items, config, task=task).patch


# ---------------------------------------------------------------- task metrics
@dataclass(frozen=True)
class TaskMetric:
    name: str
    fn: Callable[[Sequence[dict]], float]
    description: str
    scale: str = "fraction 0-1"
    ideal: float | None = None


def _acc(records):
    return sum(r["correct"] for r in records) / len(records) if records else math.nan


def _pred_rate(k):
    return lambda records: (sum(r["pred"] == k for r in records) / len(records)) if records else math.nan


def _recall(k):
    def f(records):
        rs = [r for r in records if r["gold"] == k]
        return sum(r["correct"] for r in rs) / len(rs) if rs else math.nan
    return f


def _group_accuracy(g):
    def f(records):
        rs = [r for r in records if r.get("group") == g]
        return sum(r["correct"] for r in rs) / len(rs) if rs else math.nan
    return f


def _group_gap(groups):
    def f(records):
        accs = [a for a in (_group_accuracy(g)(records) for g in groups) if not math.isnan(a)]
        return max(accs) - min(accs) if len(accs) >= 2 else math.nan
    return f


def task_metrics(task: str, items: Sequence[MCItem] | None = None) -> list[TaskMetric]:
    """Metrics of a task's test records (each a mean over instructions; std over instructions reported too).
    A task file's items (``mc:``) that name two or more ``group``s also get each group's accuracy and the gap
    between the best and worst group (0 ideal)."""
    if task.startswith("bbq"):
        from ..metrics import bbq as M

        return [TaskMetric("accuracy", _acc, "accuracy over all items", ideal=1.0),
                TaskMetric("accuracy_ambig", M.accuracy_ambig, "accuracy on ambiguous contexts (gold = UNKNOWN)", ideal=1.0),
                TaskMetric("accuracy_disambig", M.accuracy_disambig, "accuracy on disambiguated contexts", ideal=1.0),
                TaskMetric("bias_score_ambig", M.bias_score_ambig, "s_AMB ×100 (Parrish et al.)", "-100-100", 0.0),
                TaskMetric("bias_score_disambig", M.bias_score_disambig, "s_DIS ×100 (Parrish et al.)", "-100-100", 0.0)]
    if task == "sst2":
        return [TaskMetric("accuracy", _acc, "accuracy", ideal=1.0),
                TaskMetric("positive_rate", _pred_rate(1), "share of answers 'positive' (label bias; gold share ≈ 0.5)"),
                TaskMetric("recall_negative", _recall(0), "accuracy on negative reviews", ideal=1.0),
                TaskMetric("recall_positive", _recall(1), "accuracy on positive reviews", ideal=1.0)]
    out = [TaskMetric("accuracy", _acc, "accuracy", ideal=1.0)]
    groups = sorted({it.meta["group"] for it in items or () if isinstance(it.meta.get("group"), str)})
    if task.startswith("mc:") and len(groups) >= 2:
        out += [TaskMetric(f"accuracy[{g}]", _group_accuracy(g), f"accuracy on items of group {g!r}", ideal=1.0)
                for g in groups]
        out.append(TaskMetric("group_accuracy_gap", _group_gap(groups), "best minus worst group accuracy "
                              f"over {len(groups)} groups", ideal=0.0))
    return out


def per_instruction(fn):
    """Lift a metric to 'mean over instructions'; with a ``control_seed`` field, also mean over control seeds."""
    def lifted(records):
        by: dict = defaultdict(list)
        for r in records:
            by[(r.get("control_seed", 0), r.get("instruction", 0))].append(r)
        vals = []
        for rs in by.values():
            try:
                v = fn(rs)
            except ZeroDivisionError:
                v = math.nan
            if v is not None and not math.isnan(v):
                vals.append(v)
        return sum(vals) / len(vals) if vals else math.nan
    return lifted


def metric_values(records: Sequence[dict], metrics: Sequence[TaskMetric]) -> dict:
    from ..stats import mean_std

    out = {}
    instr = sorted({r.get("instruction", 0) for r in records})
    for m in metrics:
        per = [per_instruction(m.fn)([r for r in records if r.get("instruction", 0) == i]) for i in instr]
        mean, std = mean_std(per)
        out[m.name] = {"value": per_instruction(m.fn)(records), "std_over_instructions": std, "per_instruction": per}
    return out


# ---------------------------------------------------------------- the full loop (biaslab mitigate crispr)
DEFAULT_RETENTION = ("crows", "stereoset", "retention")
# `make demo`: the full loop sized for ≤ 10 min on 2 idle CPU cores — 16 dev instances for attribution, a short
# golden-section search (n ∈ [0, 16] on 10 dev items) instead of [0, 500] on the whole dev split; 50 test
# items × 2 instructions; 3 control seeds; retention on 20 items per benchmark.
# `make demo`: SST-2 label bias under the cloze protocol (the form in which the default model has sentiment skill
# and a label prior), small enough for ≤ 10 minutes on 2 CPU cores
DEMO = {"task": "sst2", "protocol": "cloze", "instructions": 3, "test_limit": 100, "search": True, "search_max": 16,
        "search_dev_limit": 60, "dev_size": 20, "trials": 1, "control_seeds": 3, "retention_limit": 20}


def score_resumable(lm, items: Sequence[MCItem], instructions: Sequence[int], *, protocol: str, run=None,
                    key: str = "task", patch=None, chunk: int = 32, desc: str = "test") -> list[dict]:
    """score_mc chunk by chunk under an optional patch; with a RunDir, finished chunks are reused (resume)."""
    import contextlib

    recs: list[dict] = []
    ctx = patch.applied(lm) if patch is not None else contextlib.nullcontext()
    with ctx:
        for c in range(0, len(items), chunk):
            done = run.finished_chunk(key, c // chunk) if run else None
            if done is not None:
                recs += [{k: v for k, v in r.items() if k not in ("benchmark", "chunk")} for r in done]
                continue
            new = score_mc(lm, list(items[c:c + chunk]), list(instructions), protocol=protocol, desc=desc)
            if run:
                run.append_chunk(key, c // chunk, new)
            recs += new
    return recs


def _save_scores(path, scores: dict[str, torch.Tensor], meta: dict) -> None:
    import json
    import os

    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"biaslab.meta": json.dumps(meta)})
    os.replace(tmp, path)


def _load_scores(path, meta: dict):
    import json

    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            m = json.loads((f.metadata() or {}).get("biaslab.meta", "{}"))
            if m.get("key") != meta["key"]:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, m.get("trials", [])
    except Exception:  # a corrupt cache is recomputed, never trusted
        return None


def run(model="smollm2-135m-instruct", task: str = "sst2", *, out, config: CrisprConfig | None = None,
        test_limit: int | None = None, test_seed: int = 0, control_seeds: int = 3, retention: bool = True,
        retention_benchmarks: Sequence[str] = DEFAULT_RETENTION, retention_limit: int | None = 50,
        n_boot: int = 1000, force: bool = False, console=None) -> dict:
    """Fit CRISPR on ``task``'s dev split, then evaluate before / after / random control (site-matched, one per
    seed) on held-out test items, plus retention benchmarks before/after; writes the run directory ``out``
    (patch.safetensors, before/, after/, control/seed<k>/, retention/, summary.json, report.html) and returns
    the summary. Interrupted runs resume (attribution, search steps and scored chunks are cached)."""
    import json
    import time
    from pathlib import Path

    from .. import stats
    from ..models import LanguageModel, load_model
    from ..runs import RunDir, atomic_write_json, clean_nan
    from ..tasks import load_task

    cfg = (config or CrisprConfig(neurons=10)).validate()
    if control_seeds < 0:
        raise BiaslabError(f"--control-seeds must be ≥ 0, got {control_seeds}")
    if test_limit is not None and test_limit <= 0:
        raise BiaslabError(f"--test-limit must be positive, got {test_limit}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    # the task first: a bad task file is reported before a model is loaded
    task_name, items = load_task(task) if isinstance(task, str) else ("custom", list(task))
    cfg = resolve_instructions(cfg, items)
    check_task_items(items, task_name, cfg.instructions)
    lm = model if isinstance(model, LanguageModel) else load_model(model)
    out = Path(out)
    args = {"method": METHOD_ID, "model": lm.spec, "fingerprint": lm.fingerprint, "task": task_name,
            "config": asdict(cfg), "test_limit": test_limit, "test_seed": test_seed, "control_seeds": control_seeds,
            "retention": list(retention_benchmarks) if retention else [], "retention_limit": retention_limit,
            "n_boot": n_boot}
    top = RunDir(out, args, force=force, extra_manifest={"model": lm.describe()})
    say = (console.print if console is not None else (lambda *a, **k: None))

    # 1. attribution on dev samples (cached)
    t = time.perf_counter()
    dev, test = split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    key = hashlib.sha256(json.dumps({k: args[k] for k in ("model", "fingerprint", "task")} | {"layout": PROMPT_LAYOUT} | {
        "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("neurons", "search", "search_max", "search_tol", "search_dev_limit",
                                                                 "search_objective", "search_small")}},
        sort_keys=True).encode()).hexdigest()
    cached = _load_scores(out / "attribution.safetensors", {"key": key})
    if cached is None:
        scores, trials_info = trial_scores(lm, dev, cfg)
        _save_scores(out / "attribution.safetensors", scores, {"key": key, "trials": trials_info})
    else:
        scores, trials_info = cached
        say("reusing cached attribution scores")
    timings["attribution"] = round(time.perf_counter() - t, 2)

    # 2. choose n and build the patch (search steps cached in search.json)
    t = time.perf_counter()
    spath = out / "search.json"
    search_cache = {}
    if cfg.search and spath.is_file():
        sj = json.loads(spath.read_text())
        if (sj.get("key") == key and sj.get("dev_limit") == cfg.search_dev_limit
                and sj.get("objective", "accuracy") == cfg.search_objective):
            search_cache = {int(k): v for k, v in sj["dev_accuracy"].items()}

    def on_step(n, acc, cache):
        say(f"  dev search: n={n:>3}  dev {cfg.search_objective} {acc:.4f}")
        atomic_write_json(spath, {"key": key, "dev_limit": cfg.search_dev_limit, "objective": cfg.search_objective,
                                  "dev_accuracy": {str(k): v for k, v in sorted(cache.items())}})

    fitres = fit_details(lm, items, cfg, task=task_name, scores=scores, trials_info=trials_info,
                         search_cache=search_cache, on_search_step=on_step)
    patch = fitres.patch
    patch.save(out / "patch.safetensors")
    timings["choose_n"] = round(time.perf_counter() - t, 2)
    say(f"CRISPR: {patch.n_neurons} neurons chosen ({'search' if cfg.search else 'fixed'})")
    notes = []
    if patch.n_neurons == 0:
        notes.append("n = 0: no number of pruned neurons beat the unpruned model on dev accuracy, so the patch is "
                     "empty and 'after' equals 'before'")
        say("[yellow]note:[/] " + notes[-1])
    if cfg.search and fitres.n == cfg.search_max:
        notes.append(f"the chosen n is the upper end of the search interval ({cfg.search_max}); a wider interval may do better")

    # 3. evaluations on held-out test items
    test_items = sample_items(test, test_limit, test_seed)
    instr = list(range(cfg.instructions))
    eval_args = {"model": lm.spec, "fingerprint": lm.fingerprint, "task": task_name,
                 "protocol": protocol_id(cfg.protocol),
                 "instructions": instr, "test_ids_hash": ids_hash(test_items)}
    metrics = task_metrics(task_name, test_items)

    def evaluate(name: str, p, same_as: list[dict] | None = None) -> list[dict]:
        tt = time.perf_counter()
        rd = RunDir(out / name, {**eval_args, "patch": p.describe() if p is not None else None}, force=force)
        if same_as is not None:  # an empty neuron mask is a no-op: the unpatched records are reused, not recomputed
            recs = [dict(r) for r in same_as]
            if rd.finished_chunk("task", 0) is None:
                rd.append_chunk("task", 0, recs)
        else:
            recs = score_resumable(lm, test_items, instr, protocol=cfg.protocol, run=rd, patch=p, desc=name)
        res = {"model": {"spec": lm.spec, "fingerprint": lm.fingerprint},
               "patch": p.describe() if p is not None else None, "task": task_name, "n_items": len(test_items),
               "metrics": metric_values(recs, metrics)}
        rd.write_results(res)
        rd.finish()
        timings[f"eval_{name}"] = round(time.perf_counter() - tt, 2)
        return recs

    before = evaluate("before", None)
    empty = patch.n_neurons == 0
    if empty:
        notes.append("empty patch: the 'after' and control records are the 'before' records (pruning no neuron "
                     "changes nothing), not re-scored")
    after = evaluate("after", patch, before if empty else None)
    counts = {k: int(v.numel()) for k, v in patch.units.items()}
    chosen = {k: v.tolist() for k, v in patch.units.items()}
    sizes = {s.name: s.n_units for s in attr.resolve_sites(lm, cfg.sites)}
    controls = {}
    for s in range(control_seeds):
        cp = NeuronMaskPatch.from_units(lm, random_units(sizes, counts, s, exclude=chosen), sites=cfg.sites,
                                        params={"method": "random-control", "seed": s, "matched_to": "crispr site counts"})
        controls[s] = evaluate(f"control/seed{s}", cp, before if empty else None)

    def boot(a, b, fn):
        r = stats.paired_bootstrap(a, b, per_instruction(fn), n_boot=n_boot, seed=0)
        return {k: r[k] for k in ("before", "after", "delta", "delta_ci95", "p", "n_items")}

    mv_before, mv_after = metric_values(before, metrics), metric_values(after, metrics)
    summary_metrics = {}
    for m in metrics:
        b = boot(before, after, m.fn)
        summary_metrics[m.name] = {**b, "std_before": mv_before[m.name]["std_over_instructions"],
                                   "std_after": mv_after[m.name]["std_over_instructions"],
                                   "description": m.description, "scale": m.scale, "ideal": m.ideal}
    control = {"n_seeds": control_seeds, "how": "per site, as many uniformly random units as CRISPR pruned there "
                                                "(never CRISPR's own units)",
               "metrics": {}}
    if controls:
        pooled = [{**r, "control_seed": s} for s, rs in controls.items() for r in rs]
        for m in metrics:
            per_seed = [metric_values(rs, [m])[m.name] for rs in controls.values()]
            vs_before = boot(before, pooled, m.fn)
            crispr_vs = boot(pooled, after, m.fn)  # after − control
            control["metrics"][m.name] = {
                "value": vs_before["after"], "per_seed": [p["value"] for p in per_seed],
                "std_over_instructions": [p["std_over_instructions"] for p in per_seed],
                "delta_vs_before": vs_before["delta"], "delta_vs_before_ci95": vs_before["delta_ci95"],
                "crispr_minus_control": crispr_vs["delta"], "crispr_minus_control_ci95": crispr_vs["delta_ci95"],
                "crispr_minus_control_p": crispr_vs["p"]}

    # 4. retention benchmarks before/after
    ret = {}
    if retention:
        tt = time.perf_counter()
        ret = retention_report(lm, patch, retention_benchmarks, limit=retention_limit, out=out / "retention",
                               force=force, n_boot=n_boot)
        timings["retention"] = round(time.perf_counter() - tt, 2)

    layer_of = {s.name: s.layer for s in attr.resolve_sites(lm, cfg.sites)}
    per_layer = Counter()
    for name, v in patch.units.items():
        per_layer[layer_of[name]] += int(v.numel())
    timings["total"] = round(time.perf_counter() - t0, 2)
    summary = {
        "method": METHOD_ID, "task": task_name,
        "model": {"spec": lm.spec, "fingerprint": lm.fingerprint},
        "patch": {**patch.describe(), "n_neurons": patch.n_neurons, "file": "patch.safetensors",
                  "neurons_per_layer": {str(k): per_layer[k] for k in sorted(per_layer)}},
        "evaluation": {"split": "test (held out from attribution and search)", "n_test_items": len(test_items),
                       "test_seed": test_seed, "instructions": instr, "protocol": protocol_id(cfg.protocol),
                       "test_ids_hash": ids_hash(test_items), "n_boot": n_boot,
                       "ci": "paired bootstrap over items (all instructions of an item resampled together), 95 %"},
        "metrics": summary_metrics, "control": control, "retention": ret,
        "search": {"dev_accuracy": {str(k): v for k, v in sorted(fitres.search.items())}, "chosen_n": fitres.n,
                   "objective": cfg.search_objective}
        if fitres.search else {"chosen_n": fitres.n, "fixed": True},
        "attribution": {"trials": trials_info, "convention": cfg.convention},
        "timings_s": timings, "notes": notes,
    }
    summary = clean_nan(json.loads(json.dumps(summary, default=str)))
    atomic_write_json(out / "summary.json", summary)
    write_report(summary, out / "report.html")
    top.finish(timings_s=timings)
    return summary



def retention_report(lm, patch, benchmarks: Sequence[str] = DEFAULT_RETENTION, *, limit: int | None = 50, out=None,
                     force: bool = False, n_boot: int = 1000) -> dict:
    """Headline metrics of other benchmarks before / after ``patch`` with paired-bootstrap CIs of the deltas and
    the width of the unpatched model's own 95 % CI (the retention criterion: |Δ| within that width)."""
    from pathlib import Path

    from .. import stats
    from ..audit import audit
    from ..benchmarks import get_benchmark

    out = Path(out) if out is not None else None
    rb = audit(lm, list(benchmarks), limit=limit, out=out / "before" if out else None, force=force, n_boot=n_boot)
    ra = audit(lm, list(benchmarks), limit=limit, patch=patch, out=out / "after" if out else None, force=force,
               n_boot=n_boot)
    ret = {}
    for bname in benchmarks:
        bench = get_benchmark(bname)
        sec = rb.results["benchmarks"][bname]
        proto = bench.protocol(sec["protocol"])
        ret[bname] = {"protocol": proto.id, "n_items": sec["n_items"], "metrics": {}}
        for mdef in bench.metric_defs(proto):
            if not mdef.headline:
                continue
            r = stats.paired_bootstrap(rb.records[bname], ra.records[bname], mdef.fn, n_boot=n_boot, seed=0)
            ci = sec["metrics"][mdef.name].get("ci95")
            width = (ci[1] - ci[0]) if ci else None
            ret[bname]["metrics"][mdef.name] = {
                **{k: r[k] for k in ("before", "after", "delta", "delta_ci95", "p")},
                "before_ci95": ci, "before_ci_width": width, "scale": mdef.scale,
                "within_ci_width": (abs(r["delta"]) <= width) if width is not None and r["delta"] == r["delta"] else None}
    return ret

def write_report(summary: dict, path) -> None:
    """report.html: before/after/control table, retention table, bias neurons per layer, dev search curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import esc, figure, fmt, fmt_ci, table, write_page

    sec = []
    if summary.get("notes"):
        sec.append(("Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in summary["notes"]) + "</ul>"))
    ctrl = summary["control"].get("metrics", {})
    rows = []
    for name, m in summary["metrics"].items():
        c = ctrl.get(name, {})
        rows.append([name, f"{fmt(m['before'])} ± {fmt(m.get('std_before'))}", f"{fmt(m['after'])} ± {fmt(m.get('std_after'))}",
                     fmt(m["delta"]), fmt_ci(m.get("delta_ci95")), fmt(c.get("value")),
                     fmt(c.get("crispr_minus_control")), fmt_ci(c.get("crispr_minus_control_ci95"))])
    ev = summary["evaluation"]
    sec.append(("Before / after / random control (held-out test split)",
                table(["metric", "before (± std over instr.)", "after (± std)", "Δ after−before", "95% CI (paired)",
                       f"random control (mean of {summary['control']['n_seeds']} seeds)", "Δ CRISPR−control",
                       "95% CI"], rows)
                + f"<p class='note'>{ev['n_test_items']} test items × {len(ev['instructions'])} instructions, protocol "
                  f"{esc(ev['protocol'])}; {esc(ev['ci'])}. Values are means over instructions.</p>"))
    if summary.get("retention"):
        rows = []
        for b, r in summary["retention"].items():
            for name, m in r["metrics"].items():
                rows.append([b, name, fmt(m["before"]), fmt(m["after"]), fmt(m["delta"]), fmt_ci(m.get("delta_ci95")),
                             fmt(m.get("before_ci_width"))])
        sec.append(("Retention (other benchmarks, before / after)",
                    table(["benchmark", "metric", "before", "after", "Δ", "95% CI of Δ", "width of before's 95% CI"], rows)))
    per_layer = summary["patch"].get("neurons_per_layer", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    layers = sorted(int(k) for k in per_layer)
    n_layers = max(layers) + 1 if layers else 1
    axes[0].bar(range(n_layers), [per_layer.get(str(i), 0) for i in range(n_layers)], color="#b00020")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("pruned bias neurons")
    axes[0].set_title(f"{summary['patch']['n_neurons']} bias neurons ({summary['patch']['params']['sites']} sites)")
    srch = summary.get("search", {}).get("dev_accuracy")
    if srch:
        xs = sorted(int(k) for k in srch)
        axes[1].plot(xs, [srch[str(x)] for x in xs], "o-")
        axes[1].axvline(summary["search"]["chosen_n"], color="#b00020", ls="--")
        axes[1].set_xlabel("n pruned")
        axes[1].set_ylabel("dev accuracy")
        axes[1].set_title("golden-section search on dev")
    else:
        axes[1].axis("off")
        axes[1].text(0.1, 0.5, f"n fixed at {summary['search']['chosen_n']}")
    sec.append(("Bias neurons per layer", figure(fig, alt="bias neurons per layer")))
    p = summary["patch"]["params"]
    sec.append(("Method", "<ul>" + "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in p.items()
                                           if k not in ("search",)) + "</ul>"
                + f"<p class='note'>timings (s): {esc(summary.get('timings_s'))}</p>"))
    write_page(path, f"biaslab CRISPR — {summary['task']}", sec,
               subtitle=f"model {summary['model']['spec']} ({summary['model']['fingerprint'][:19]}…), "
                        f"convention {summary['attribution']['convention']}")


def load_patch_units(path) -> dict[str, torch.Tensor]:
    """The pruned units of a saved neuron-mask patch, {site: unit indices}."""
    from ..patches import load_patch

    p = load_patch(path)
    if not isinstance(p, NeuronMaskPatch):
        raise BiaslabError(f"{path} is a {p.kind} patch, not a neuron-mask patch")
    return p.units
