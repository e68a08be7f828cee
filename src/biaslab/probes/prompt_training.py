"""Prompt tuning of a soft prompt on a frozen model (Lester et al. 2021; Tian et al. 2023; docs/methods/softprompt.md):
peft's prompt-tuning encoder, AdamW on the prompt only, seeded similar-length batches, and — for several processes —
batches cut into parts whose gradients :func:`biaslab.distributed.summed_gradients` adds in part order."""
from __future__ import annotations

import contextlib
import random
import time

import torch

from .. import distributed as D
from ..models.finite import refuse_bad_loss
from ..progress import progress_bar
from .data import Sentence
from .softprompt import SoftPrompt, SoftPromptConfig, accuracy, encode, label_logits, predict


@contextlib.contextmanager
def frozen(model):
    """Base weights need no gradients while the prompt trains (restores the previous flags afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def make_prompt_encoder(lm, cfg: SoftPromptConfig):
    """peft's prompt-tuning encoder for ``lm``, initialised under ``cfg.seed`` (SAMPLE_VOCAB: k random
    vocabulary embeddings, as in Lester et al. 2021)."""
    from peft import PromptEmbedding, PromptTuningConfig

    mc = lm.model.config
    pcfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens,
                              token_dim=lm.model.get_input_embeddings().embedding_dim, num_transformer_submodules=1,
                              num_attention_heads=getattr(mc, "num_attention_heads", None),
                              num_layers=getattr(mc, "num_hidden_layers", None), prompt_tuning_init=cfg.init)
    torch.manual_seed(cfg.seed)
    enc = PromptEmbedding(pcfg, lm.model.get_input_embeddings()).to(lm.device)
    pdict = {k: (v.value if hasattr(v, "value") else v) for k, v in pcfg.to_dict().items()
             if isinstance(v, (str, int, float, bool, type(None))) or hasattr(v, "value")}
    return enc, pdict


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Seeded batches of similar-length items: shuffle, sort inside windows of 4 batches, shuffle the batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    win = 4 * batch_size
    for w in range(0, len(idx), win):
        chunk = sorted(idx[w:w + win], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_step(lm, encoder, rows, golds, label_ids, opt, clip: float = 1.0, step: int = 1) -> float:
    """One optimisation step of the prompt on a batch; returns the loss (restricted 3-way cross-entropy); a NaN or
    infinite loss is an error before the step."""
    prefix = encoder.embedding.weight
    logits = label_logits(lm, prefix, rows, label_ids)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(golds, device=logits.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    value = refuse_bad_loss(float(loss.detach()), "soft-prompt training", step, lm.dtype, "--lrs")
    if clip:
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), clip)
    opt.step()
    return value


def train_step_in_parts(lm, encoder, rows, golds, label_ids, opt, micro: int, clip: float = 1.0, step: int = 1) -> float:
    """:func:`train_step` with the batch cut into parts of ``micro`` sentences, part k on rank k mod world: each
    part's loss is its summed cross-entropy over the batch size, so the parts add up to the batch's mean, and
    :func:`biaslab.distributed.summed_gradients` adds their gradients in part order. One process with the same
    ``micro`` computes the same parts one after another, so it trains the same prompt bit for bit (a prompt trained
    in parts differs from the whole-batch one by float rounding: each part pads to its own widest row)."""
    weight = encoder.embedding.weight
    B = len(rows)

    def part_loss(k):
        part = slice(k * micro, (k + 1) * micro)
        logits = label_logits(lm, weight, rows[part], label_ids)
        gold = torch.tensor(golds[part], device=logits.device)
        return torch.nn.functional.cross_entropy(logits, gold, reduction="sum") / B

    loss = refuse_bad_loss(sum(D.summed_gradients([weight], (B + micro - 1) // micro, part_loss)),
                           "soft-prompt training", step, lm.dtype, "--lrs")
    if clip:
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), clip)
    opt.step()
    return loss


VAL_CHUNK = 32   # validation sentences per shard when a prompt is trained in parts (one scoring batch)


def train_soft_prompt(lm, cfg: SoftPromptConfig, train: list[Sentence], val: list[Sentence], *,
                      progress: bool | None = None, micro_batch_size: int | None = None) -> SoftPrompt:
    """Prompt-tune on ``train``; measure accuracy on ``val``. The base model's weights are never changed.
    ``micro_batch_size``: every batch in parts of that many sentences shared across ranks
    (:func:`train_step_in_parts`), and the validation in chunks of ``VAL_CHUNK`` shared likewise; None trains
    each batch whole, on this rank alone."""
    t0, c0 = time.perf_counter(), time.process_time()
    encoder, pdict = make_prompt_encoder(lm, cfg)
    enc = encode(lm, cfg, [s.text for s in train], cfg.max_length)
    golds = [s.label for s in train]
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    was_training = lm.model.training
    lm.model.eval()
    show = lm.progress if progress is None else progress
    with frozen(lm.model), progress_bar(len(train) * cfg.epochs, D.shared_label(f"prompt-tuning {cfg.name}"),
                                        enabled=show) as advance:
        for _ in range(cfg.epochs):
            for batch in length_batches([len(r) for r in enc.rows], cfg.batch_size, rng):
                rows, gold = [enc.rows[i] for i in batch], [golds[i] for i in batch]
                if micro_batch_size:
                    loss = train_step_in_parts(lm, encoder, rows, gold, enc.label_ids, opt, micro_batch_size, cfg.clip,
                                               step=len(losses) + 1)
                else:
                    loss = train_step(lm, encoder, rows, gold, enc.label_ids, opt, cfg.clip, step=len(losses) + 1)
                losses.append(round(loss, 5))
                recent = losses[-10:]
                advance(len(batch), loss=sum(recent) / len(recent))
    lm.model.train(was_training)
    sp = SoftPrompt(encoder.embedding.weight.detach().cpu().clone(), cfg, lm.fingerprint, lm.spec)
    texts = [s.text for s in val]
    label = f"validating {cfg.name}"
    if micro_batch_size:   # every rank holds the prompt: the validation is sharded too (the same chunks in 1 and N)
        preds = D.sharded_map(lambda part: predict(lm, sp, part, desc=label, progress=progress), texts, VAL_CHUNK,
                              desc=label, enabled=show)
    else:
        preds = predict(lm, sp, texts, desc=label, progress=progress)
    sp.val_accuracy = accuracy(preds, [s.label for s in val])
    sp.info = {"losses": losses, "n_train": len(train), "n_val": len(val), "train_wall_s": round(time.perf_counter() - t0, 1),
               "train_cpu_s": round(time.process_time() - c0, 1), "peft_config": pdict,
               **({"micro_batch_size": micro_batch_size} if micro_batch_size else {})}
    return sp
