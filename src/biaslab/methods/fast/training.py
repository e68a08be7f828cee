"""FAST training (docs/methods/fast.md): L = L_e + α·L_s1 + β·L_s2 for the stamp, or for the layer's MLP weights
(the FT-L baseline, kept at the checkpoint matched to FAST on dev), and the dev diagnostics used to choose.

Several processes: with ``micro_batch_pairs`` M every step's work is cut into parts — the pairs of L_e, the
subject prompts of L_s1 and the WikiText windows of L_s2, M at a time — each part's loss is its share of the
step's loss (sums over its pairs / positions divided by the step's counts), and
:func:`biaslab.distributed.summed_gradients` adds the parts' gradients in part order, part k on rank k mod world.
One process with the same M computes the same parts in turn, so 1 and N processes train the same stamp bit for
bit; the dev split's diagnostics are then shared too, in fixed chunks (:func:`dev_stats`). Without it (the
default: the recorded numbers) every rank computes each step whole."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from ... import distributed as D
from ...errors import BiaslabError
from ...models.finite import refuse_bad_loss
from ...progress import progress_bar
from .config import METHOD_VERSION, FastConfig
from .kl_texts import make_kl_sets
from .pairs import SUBJECT_TEMPLATES, KnowledgePair
from .stamp import StampFFN, attach_stamp


def pair_logprobs(lm, prompts: list[str], objects: list[str], *, with_first: bool = False):
    """Differentiable mean log P(object tokens | prompt), tokenised exactly as ``lm.loglikelihood`` does.
    ``with_first``: also return the full next-token log-distribution at each prompt's end (the position that
    predicts the object's first token), shape (len(prompts), vocab)."""
    pieces = [lm.split_context(p, " " + o) for p, o in zip(prompts, objects)]
    seqs = [(c + x)[:-1] for c, x in pieces]
    ids, mask, pos, offs = lm.pad(seqs, side="right")
    rows, cols, tgt, owner, first = [], [], [], [], []
    for k, (c, x) in enumerate(pieces):
        end = offs[k] + len(seqs[k])
        first.append(len(rows))  # the row predicting piece k's first object token
        for j in range(len(x)):
            rows.append(k)
            cols.append(end - len(x) + j)
            tgt.append(x[j])
            owner.append(k)
    dev = ids.device
    lp = torch.log_softmax(lm.logits_at(ids, mask, pos, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)), -1)
    tok = lp.gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
    owner_t = torch.tensor(owner, device=dev)
    sums = torch.zeros(len(pieces), device=dev, dtype=tok.dtype).index_add(0, owner_t, tok)
    counts = torch.zeros(len(pieces), device=dev, dtype=tok.dtype).index_add(0, owner_t, torch.ones_like(tok))
    if not with_first:
        return sums / counts
    return sums / counts, lp[torch.tensor(first, device=dev)]


def js_divergence(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence (nats, ≤ ln 2) between two batches of log-distributions."""
    lm_ = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm_)).sum(-1) + (lq.exp() * (lq - lm_)).sum(-1))


def fairness_terms(lm, pairs: list[KnowledgePair], cfg: "FastConfig") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per pair: the squared log-prob gap of the object (n,) and, under ``gap+js``, the JS divergence (n,)
    (None under ``gap``)."""
    n = len(pairs)
    prompts = [p.prompt_1 for p in pairs] + [p.prompt_2 for p in pairs]
    objects = [p.object for p in pairs] * 2
    if cfg.fairness == "gap":
        lps, js = pair_logprobs(lm, prompts, objects), None
    else:
        lps, first = pair_logprobs(lm, prompts, objects, with_first=True)
        js = js_divergence(first[:n].float(), first[n:].float())
    return (lps[:n] - lps[n:]) ** 2, js


def fairness_loss(lm, pairs: list[KnowledgePair], cfg: "FastConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """L_e of a batch of pairs, and the Jensen-Shannon part alone (0 under ``fairness="gap"``).

    ``gap`` (the paper's L_e): mean over pairs of (mean-token log P(o|s1,r) − mean-token log P(o|s2,r))².
    ``gap+js`` (a named deviation): the same plus ``js_weight`` × the JS divergence between the two prompts' whole
    next-token distributions at the object position — "indifferent between s1 and s2 for this r" for every
    candidate object, not only the stereotype filler o, so the stamp is taught what the group term must not change
    rather than one object's offset."""
    sq, js = fairness_terms(lm, pairs, cfg)
    js = torch.zeros(()) if js is None else js.mean()
    return sq.mean() + cfg.js_weight * js, js


def step_in_parts(lm, params, cfg: "FastConfig", pairs: list[KnowledgePair], subj, s_idx, text, t_idx,
                  alpha: float, beta: float) -> dict:
    """One step's gradients in parts of ``cfg.micro_batch_pairs`` (module docstring), set on ``params``; returns
    the step's loss terms (each the sum of its parts' values, in part order)."""
    m = cfg.micro_batch_pairs
    cut = lambda xs: [xs[k:k + m] for k in range(0, len(xs), m)]  # noqa: E731
    parts = [("L_e", c) for c in cut(pairs)]
    parts += [("L_s1", c) for c in cut(s_idx)] if subj else []
    parts += [("L_s2", c) for c in cut(t_idx)] if text else []
    counts = {"L_e": len(pairs), "L_s1": subj.positions(s_idx) if subj else 0,
              "L_s2": text.positions(t_idx) if text else 0}

    def part_loss(k):
        kind, chunk = parts[k]
        if kind == "L_e":
            sq, js = fairness_terms(lm, chunk, cfg)
            js_sum = torch.zeros(()) if js is None else js.sum()
            le = (sq.sum() + cfg.js_weight * js_sum) / counts[kind]
            return le, {"L_e": float(le.detach()), "JS": float(js_sum.detach()) / counts[kind]}
        kl = (subj if kind == "L_s1" else text).kl_sum(chunk) / counts[kind]
        return (alpha if kind == "L_s1" else beta) * kl, {kind: float(kl.detach())}

    out = D.summed_gradients(params, len(parts), part_loss)
    rec = {"loss": 0.0, "L_e": 0.0, "L_s1": 0.0, "L_s2": 0.0, "JS": 0.0}
    for loss, info in out:
        rec["loss"] += loss
        for key, v in info.items():
            rec[key] += v
    return rec


DEV_CHUNK = 32   # dev pairs per shard when the dev split is shared between ranks (with micro_batch_pairs)


def pair_preference_ss(lm, pairs: list[KnowledgePair], desc: str = "dev split", *, shared: bool = False) -> float:
    """Quick SS (0-100) of pairs (no bootstrap; NaN for no pairs): used on the dev split during training."""
    return dev_stats(lm, pairs, desc, shared=shared)["ss"] if pairs else math.nan


def dev_stats(lm, pairs: list[KnowledgePair], desc: str = "dev split", *, shared: bool = False) -> dict:
    """Dev-split diagnostics used for model selection: SS and the mean |log P(o|s1,r) − log P(o|s2,r)|.
    ``shared`` (with ``micro_batch_pairs``, where every rank holds the same edit): the pairs in fixed chunks of
    ``DEV_CHUNK``, chunk k on rank k mod world, so 1 and N processes score the same chunks; else scored whole."""
    if not pairs:
        return {"ss": None, "mean_abs_gap": None, "n": 0}

    def gaps_of(part):
        sc = lm.loglikelihood([(p.prompt_1, " " + p.object) for p in part] +
                              [(p.prompt_2, " " + p.object) for p in part], desc=desc)
        return [sc[i].logprob - sc[len(part) + i].logprob for i in range(len(part))]

    gaps = (D.sharded_map(gaps_of, pairs, DEV_CHUNK, desc=desc, per_item=2, enabled=lm.progress) if shared
            else gaps_of(pairs))
    n = len(pairs)
    ss = 100.0 * sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gaps) / n
    return {"ss": ss, "mean_abs_gap": sum(abs(g) for g in gaps) / n, "n": n}


@dataclass
class TrainResult:
    mode: str
    history: list[dict] = field(default_factory=list)
    stamp: StampFFN | None = None
    mlp_state: dict | None = None     # FT-L: the chosen checkpoint's MLP weights
    chosen_step: int | None = None
    dev_ss: float | None = None
    dev_gap: float | None = None      # dev mean |log P(o|s1,r) − log P(o|s2,r)| of the kept state (FT-L)
    match_key: tuple | None = None    # FT-L: (|dev SS − target|, |dev gap − target|, step) of the kept checkpoint
    lr: float | None = None


def train(lm, pairs: list[KnowledgePair], layer: int, cfg: FastConfig, *, mode: str = "stamp",
          alpha: float | None = None, beta: float | None = None, dev_pairs: list[KnowledgePair] | None = None,
          match_dev_ss: float | None = None, match_dev_gap: float | None = None, desc: str | None = None,
          kl_sets: dict | None = None, on_step=None) -> TrainResult:
    """Train the stamp (``mode="stamp"``) or the layer's MLP weights (``mode="ftl"``, learning rate
    ``cfg.ftl_lr``) with L = L_e + α·L_s1 + β·L_s2. For FT-L with ``match_dev_ss``, checkpoints every
    ``ftl_eval_every`` steps are scored on ``dev_pairs`` and the one whose dev SS is closest to ``match_dev_ss``
    is kept, ties (dev SS moves in steps of 100/n) broken by the dev mean |gap| closest to ``match_dev_gap``, then
    by the earlier step. ``on_step(rec)`` is called after every step with the edit in place (diagnostics)."""
    from ...tracing import check_layer, layer_modules

    if not pairs:
        raise BiaslabError("FAST needs at least one training pair")
    check_layer(lm.model, layer)
    alpha = cfg.alpha if alpha is None else alpha
    beta = cfg.beta if beta is None else beta
    model = lm.model
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"train:{cfg.seed}:{mode}")
    if kl_sets is None and (alpha or beta):
        kl_sets = make_kl_sets(lm, pairs, cfg)
    subj = kl_sets["subject"] if alpha else None
    text = kl_sets["text"] if beta else None

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    mlp = layer_modules(model)[1][layer]
    handle, stamp, saved = None, None, None
    if mode == "stamp":
        d = model.get_input_embeddings().weight.shape[1]
        # trained in float32 whatever the model's dtype (bf16 on a GPU: Adam's small updates would round away)
        stamp = StampFFN(d, cfg.width, cfg.activation, cfg.init).to(device=next(mlp.parameters()).device,
                                                                     dtype=torch.float32)
        handle = attach_stamp(lm, layer, stamp)
        params = list(stamp.parameters())
        lr = cfg.lr
    elif mode == "ftl":
        saved = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
        params = list(mlp.parameters())
        for p in params:
            p.requires_grad_(True)
        lr = cfg.ftl_lr
    else:
        raise BiaslabError(f"unknown training mode {mode!r}")
    opt = torch.optim.Adam(params, lr=lr)
    res = TrainResult(mode)
    checkpoints = []
    was_training = model.training
    model.eval()  # dropout off; gradients still flow
    try:
        label = desc or f"training ({mode})"
        shared = bool(cfg.micro_batch_pairs)   # every rank holds the same edit: the dev split is shared too
        with progress_bar(cfg.steps, D.shared_label(label), unit="steps",
                          enabled=lm.progress) as advance:
            for step in range(1, cfg.steps + 1):
                with torch.enable_grad():
                    batch = rng.sample(range(len(pairs)), min(cfg.batch_pairs, len(pairs)))
                    bp = [pairs[i] for i in batch]
                    s_idx = rng.sample(range(len(subj.seqs)), min(cfg.batch_subject, len(subj.seqs))) if subj else []
                    t_idx = rng.sample(range(len(text.seqs)), min(cfg.batch_text, len(text.seqs))) if text else []
                    if cfg.micro_batch_pairs:   # shared across ranks, the same numbers as one process
                        rec = {"step": step, **step_in_parts(lm, params, cfg, bp, subj, s_idx, text, t_idx, alpha, beta)}
                    else:
                        le, js = fairness_loss(lm, bp, cfg)
                        ls1 = subj.kl(s_idx) if subj else torch.zeros(())
                        ls2 = text.kl(t_idx) if text else torch.zeros(())
                        loss = le + alpha * ls1 + beta * ls2
                        opt.zero_grad()
                        loss.backward()
                        rec = {"step": step, "loss": loss.item(), "L_e": le.item(), "L_s1": float(ls1.detach()),
                               "L_s2": float(ls2.detach()), "JS": float(js.detach())}
                    refuse_bad_loss(rec["loss"], f"FAST {mode} training", step, lm.dtype,
                                    "--lr" if mode == "stamp" else "--ftl-lrs")
                    opt.step()
                if cfg.fairness == "gap":
                    rec.pop("JS")
                if mode == "ftl" and match_dev_ss is not None and dev_pairs and (step % cfg.ftl_eval_every == 0 or step == cfg.steps):
                    st = dev_stats(lm, dev_pairs, f"{label}: dev split at step {step}", shared=shared)
                    rec["dev_ss"], rec["dev_mean_abs_gap"] = st["ss"], st["mean_abs_gap"]
                    key = (abs(st["ss"] - match_dev_ss),
                           0.0 if match_dev_gap is None else abs(st["mean_abs_gap"] - match_dev_gap), step)
                    checkpoints.append((key, st, {k: v.detach().clone() for k, v in mlp.state_dict().items()}))
                res.history.append(rec)
                if on_step is not None:
                    on_step(rec)
                advance(1, loss=rec["loss"], L_e=rec["L_e"])
        if mode == "stamp":
            stamp.eval().requires_grad_(False)
            res.stamp = stamp
            if dev_pairs:
                res.dev_ss = pair_preference_ss(lm, dev_pairs, f"{label}: dev split", shared=shared)
        else:
            res.lr = lr
            if checkpoints:
                res.match_key, st, state = min(checkpoints, key=lambda c: c[0])
                res.chosen_step, res.dev_ss, res.dev_gap = res.match_key[2], st["ss"], st["mean_abs_gap"]
            else:
                state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
                res.chosen_step = cfg.steps
                if dev_pairs:
                    st = dev_stats(lm, dev_pairs, f"{label}: dev split", shared=shared)
                    res.dev_ss, res.dev_gap = st["ss"], st["mean_abs_gap"]
            res.mlp_state = state
    finally:
        if handle is not None:
            handle.remove()
        if saved is not None:
            with torch.no_grad():
                mlp.load_state_dict(saved)
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    return res


def ftl_patch(lm, layer: int, state: dict, *, params: dict | None = None):
    """The FT-L result as a patch (kind ``weights``): the layer's MLP parameters replaced by ``state``."""
    from ...patches import WeightsPatch
    from ...tracing import layer_modules

    mlp = layer_modules(lm.model)[1][layer]
    path = next(n for n, mod in lm.model.named_modules() if mod is mlp)
    return WeightsPatch.from_state(lm, state, prefix=path, params={"method": "ft-l", "layer": layer, **(params or {})})


def choices(cfg: FastConfig) -> dict:
    """Every choice the paper left open, for the manifest / summary."""
    return {
        "implementation": f"FAST-style reimplementation ({METHOD_VERSION}); the authors published no code",
        "pairs": "StereoSet intrasentence (stereoset_partial): prompt = stereotype sentence up to the filler, "
                 "object = stereotype filler, s2 = fixed counterpart (race/religion: hand-written table; gender: "
                 "CDA swap of all gendered words in the prompt); clusters whose filler precedes the group term "
                 "are skipped and counted",
        "crows_pairs": "evaluation only (authors' request): cross-dataset PS pairs, prompt = sentence up to the "
                       "last differing word, object = shared rest",
        "split": "by statement (lower-cased context), seeded, per bias type: train 60 % / dev 10 % / test 30 %",
        "tracing": "ROME-style Gaussian noise (3 × std of subject-token embeddings) on subject tokens, restore one "
                   "layer at the last subject token, mean log-prob of the whole object (not ROME's first-token "
                   "probability), decisive = argmax of the single-layer MLP curve unless --layer is given",
        "stamp": f"d -> {cfg.width} -> d, {cfg.activation}, input = the MLP's input, output added to the MLP's "
                 f"output at every position; first layer initialised '{cfg.init}', second layer zero-initialised",
        "L_e": "mean over pairs of (mean-token log P(o|s1,r) - mean-token log P(o|s2,r))^2"
               + ("" if cfg.fairness == "gap" else
                  f" + {cfg.js_weight:g} x JS(P(.|s1,r) || P(.|s2,r)) of the whole next-token distribution at the "
                  "object position (a deviation: fairness=gap+js)"),
        "L_s1": f"KL(orig || stamped) at all positions of {len(SUBJECT_TEMPLATES)} lexical templates filled with "
                "the training pairs' group terms",
        "L_s2": "KL(orig || stamped) at all positions of WikiText-2 validation windows",
        "optimizer": f"Adam, lr {cfg.lr} (FT-L: each of {', '.join(f'{x:g}' for x in cfg.ftl_lrs)}), {cfg.steps} steps",
        "ftl_matching": "over FT-L's learning rates and its checkpoints every "
                        f"{cfg.ftl_eval_every} steps, the one whose dev-split SS is closest to FAST's dev SS, ties "
                        "broken by the dev mean |gap| closest to FAST's, then the earlier step",
        "config": cfg.to_json(),
    }

