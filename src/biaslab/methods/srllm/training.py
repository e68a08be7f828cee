"""SR_LLM training (Raza et al. 2024, arXiv 2404.01399; docs/methods/srllm.md): the LoRA fit with early stopping on
validation loss, and its data parallelism over processes (docs/SCALE.md).

Data parallelism without changing the numbers: ``micro_batch_size`` cuts every batch into parts of that many
examples. Each part's loss is its mean completion loss weighted by its share of the batch's completion tokens (so
the parts add up to the batch's mean loss), its LoRA dropout is drawn from a generator seeded by (seed, step,
part), and :func:`biaslab.distributed.summed_gradients` adds the parts' gradients in part order — part k on rank
k mod world. One process with the same ``micro_batch_size`` computes the same parts one after another, so it trains
the same adapter bit for bit. Without ``micro_batch_size`` (the default, one part per batch: the numbers of
``experiments/srllm``) every rank trains the whole batch itself, as one process does. The validation loss is always
sharded by batch (the same batches in one process and in N).
"""
from __future__ import annotations

import math
import random
import time
import zlib
from dataclasses import dataclass, field

import torch

from ... import distributed as D
from ...errors import BiaslabError
from ...models.finite import refuse_bad_loss
from ...progress import progress_bar
from .config import INSTRUCTION, PROTOCOL_ID, SYSTEM_PROMPT, SRLLMConfig
from .lora import LoraPatch, _load_lora_weights, collate, completion_loss, encode_pairs, inject_lora, lora_weights, remove_lora


def _batches(n: int, batch_size: int, lengths: list[int], rng: random.Random) -> list[list[int]]:
    """Seeded shuffle, then length-sorted inside windows of 16 batches (less padding), batch order shuffled."""
    order = list(range(n))
    rng.shuffle(order)
    win = batch_size * 16
    batches = []
    for w in range(0, n, win):
        chunk = sorted(order[w:w + win], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def validation_loss(lm, examples, batch_size: int) -> float:
    """Mean completion loss over ``examples`` (length-sorted batches; under torch.distributed batch k is scored on
    rank k mod world and the batch losses are added in batch order, as in one process)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))

    @torch.no_grad()
    def score(part):
        loss, n = completion_loss(lm, collate([examples[i] for i in part], lm.pad_id))
        return [(float(loss), n)]

    total = count = 0.0
    for loss, n in D.sharded_map(score, order, batch_size):
        total += loss * n
        count += n
    return total / count if count else math.nan


def _target_tokens(example) -> int:
    """The completion tokens an example is trained on (its labels after the first position that are not −100)."""
    return sum(1 for y in example[1][1:] if y != -100)


def batch_gradients(lm, train, batch: list[int], params, cfg: SRLLMConfig, step: int) -> float:
    """Set ``params``' gradients to the batch's and return its loss: in one piece (no ``micro_batch_size``: the
    model's own dropout stream), or in parts of ``micro_batch_size`` examples shared across ranks (module
    docstring)."""
    m = cfg.micro_batch_size
    if not m:
        loss, _ = completion_loss(lm, collate([train[i] for i in batch], lm.pad_id))
        for p in params:
            p.grad = None
        loss.backward()
        return float(loss.detach())
    parts = [batch[k:k + m] for k in range(0, len(batch), m)]
    n_total = sum(_target_tokens(train[i]) for i in batch)
    devices = [lm.device] if str(lm.device).startswith("cuda") else []

    def part_loss(k):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(zlib.crc32(f"srllm-dropout:{cfg.seed}:{step}:{k}".encode()))
            loss, n = completion_loss(lm, collate([train[i] for i in parts[k]], lm.pad_id))
            return loss * (n / n_total)

    return sum(D.summed_gradients(params, len(parts), part_loss))


@dataclass
class TrainResult:
    patch: "LoraPatch"
    history: dict = field(default_factory=dict)


def train_lora(lm, train_pairs, val_pairs, cfg: SRLLMConfig | None = None, *, progress: bool | None = None,
               provenance: dict | None = None, max_steps: int | None = None, log=None) -> TrainResult:
    """Fit a LoRA rewriter on ``train_pairs`` with early stopping on ``val_pairs`` (lists of RewritePair).

    ``lm.model`` is left exactly as it was (adapter removed, requires_grad flags and train/eval mode restored)."""
    cfg = cfg or SRLLMConfig()
    if not cfg.target_modules:  # the family's projections, from the sites table
        from dataclasses import replace

        from ...models.sites import lora_targets

        cfg = replace(cfg, target_modules=lora_targets(lm.model))
    used_sources: dict = {}
    train, skipped = encode_pairs(lm, train_pairs, cfg.max_length, kept_sources=used_sources)
    val, val_skipped = encode_pairs(lm, val_pairs, cfg.max_length)
    if not train:
        raise BiaslabError(f"no training example fits in max_length={cfg.max_length} tokens "
                           f"({skipped} skipped); raise --max-length")
    model = lm.model
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    warm = max(1, round(cfg.warmup * total_steps)) if cfg.warmup > 0 else 0
    history = {"train_loss": [], "val_loss": [], "n_train": len(train), "n_train_skipped_too_long": skipped,
               "n_val": len(val), "n_val_skipped_too_long": val_skipped, "n_train_by_source": used_sources, "total_steps_planned": total_steps,
               "train_tokens": 0}
    if D.world_size() > 1 and not cfg.micro_batch_size and log:
        log(f"{D.world_size()} processes, no --micro-batch-size: every rank trains every batch whole (set e.g. "
            f"--micro-batch-size {max(1, cfg.batch_size // D.world_size())} to share each batch; the adapter then "
            f"equals a 1-process run with the same setting)")
    t0 = time.perf_counter()
    layers = inject_lora(model, cfg)
    try:
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        best = (math.inf, lora_weights(layers), 0)
        bad_checks, step, stopped_early = 0, 0, False
        lengths = [len(x) for x, _ in train]

        def check(step):
            nonlocal best, bad_checks
            if not val:
                return False
            model.eval()
            vl = validation_loss(lm, val, cfg.batch_size)
            model.train()
            history["val_loss"].append({"step": step, "loss": vl})
            if vl < best[0] - 1e-4:
                best, bad_checks = (vl, lora_weights(layers), step), 0
            else:
                bad_checks += 1
            if log:
                recent = history["train_loss"][-cfg.eval_every:]
                log(f"step {step}/{total_steps}: train loss {sum(recent) / len(recent):.4f}, validation loss "
                    f"{vl:.4f} (best {best[0]:.4f} at step {best[2]}), {time.perf_counter() - t0:.0f} s")
            return bad_checks >= cfg.patience

        with progress_bar(total_steps, D.shared_label("SR_LLM LoRA training"), unit="steps",
                          enabled=progress) as advance:
            model.train()
            while step < total_steps and not stopped_early:
                for b in _batches(len(train), cfg.batch_size, lengths, rng):
                    if step >= total_steps:
                        break
                    loss = refuse_bad_loss(batch_gradients(lm, train, b, params, cfg, step), "SR_LLM LoRA training",
                                           step + 1, lm.dtype, "--lr")
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    step += 1
                    history["train_tokens"] += sum(len(train[i][0]) for i in b)
                    history["train_loss"].append(loss)
                    info = {"loss": history["train_loss"][-1]}
                    if step % cfg.eval_every == 0 or step == total_steps:
                        stopped_early = check(step) and step < total_steps
                        if history["val_loss"]:
                            info["val"] = history["val_loss"][-1]["loss"]
                    advance(1, **info)
                    if stopped_early:
                        break
        if val:
            _load_lora_weights(layers, best[1])
        weights = lora_weights(layers)
        history.update({"steps": step, "epochs_run": round(step / steps_per_epoch, 3), "stopped_early": stopped_early,
                        "best_step": best[2] if val else step, "best_val_loss": best[0] if val else None,
                        "train_seconds": round(time.perf_counter() - t0, 1)})
    finally:
        remove_lora(model)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, True))
        model.train(was_training)
    params_ = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
               "scale": cfg.scale, "system_prompt": SYSTEM_PROMPT, "instruction": INSTRUCTION, "protocol": PROTOCOL_ID}
    prov = {"method": "srllm", "paper": "Raza et al. 2024, arXiv 2404.01399", "config": cfg.to_dict(),
            **{k: v for k, v in history.items() if k not in ("train_loss", "val_loss", "train_seconds")},
            **(provenance or {})}
    patch = LoraPatch.from_weights(lm, weights, params=params_, provenance=prov)
    return TrainResult(patch, history)
