"""SR_LLM (Raza et al. 2024, arXiv 2404.01399; METHODS.md §4): LoRA instruction fine-tuning that teaches a
model to rewrite biased text into neutral text keeping its information.

Recipe (paper code → biaslab):

- LoRA through peft (``inject_adapter_in_model``) on q/k/v/o and gate/up/down. Paper: Llama-2-7b-chat,
  QLoRA 4-bit, r = 64, α = 16, dropout 0.2, LR 2e-4 constant, warmup 0.03, batch 4, max length 512, 1 epoch.
  Here (135M default model, fp32, CPU): r = 16, α = 32, dropout 0.05, LR 5e-4 (constant after 3 % warmup),
  batch 8, max length 128, 1 epoch; no quantisation.
- The model's own chat template with a system message and the instruction :data:`INSTRUCTION`.
- Fixes of the paper code's known defects: loss on the completion only (prompt labels −100), a real EOS
  learned (the tokenizer's EOS, ``<|im_end|>`` for SmolLM2, appended to every completion), a seeded split.
- Added: early stopping on validation loss (the paper trains one fixed epoch); the best adapter is kept.
- Data: the public pairs in ``data/debias_rewrites`` (the paper's own data was never released); see
  :mod:`biaslab.mitigations.srllm_data`. Examples longer than ``max_length`` tokens are skipped (counted), so no
  completion is ever cut.

The result is a :class:`LoraPatch` (kind ``lora``): applied by forward hooks adding ``scale·B·A·x`` to the
target Linear layers (weights untouched, so removal is exact) and exported by merging ``W += scale·B·A``.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import BiaslabError
from ..patches import Patch
from ..progress import progress_bar

SYSTEM_PROMPT = ("You are a text-debiasing assistant. You rewrite text so that it is free of bias "
                 "and keeps all of its information.")
INSTRUCTION = "Rewrite the following text so that it is free of bias while keeping its information: {text}"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROTOCOL_ID = "srllm.rewrite.v1"   # prompt (system + instruction, chat template) + greedy decoding


@dataclass
class SRLLMConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.03
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 128
    eval_every: int = 25          # optimizer steps between validation-loss checks
    patience: int = 3             # checks without improvement before stopping
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        checks = [(self.r >= 1, f"LoRA rank r must be >= 1, got {self.r}"),
                  (self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}"),
                  (0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}"),
                  (bool(self.target_modules), "at least one LoRA target module is needed"),
                  (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                  (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
                  (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                  (self.max_length >= 16, f"max length must be >= 16 tokens, got {self.max_length}"),
                  (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
                  (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
                  (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}")]
        for ok, msg in checks:
            if not ok:
                raise BiaslabError(msg)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# ---------------------------------------------------------------------------------------------- prompts
def build_prompt(lm, text: str) -> str:
    """The prompt the rewriter sees: chat template, system message, instruction with the text."""
    return lm.render(INSTRUCTION.format(text=text), system=SYSTEM_PROMPT)


def eos_id(lm) -> int:
    eid = lm.tokenizer.eos_token_id
    if eid is None:
        raise BiaslabError(f"the tokenizer of {lm.spec} has no EOS token; SR_LLM needs one to learn where a rewrite ends")
    return int(eid)


def encode_example(lm, biased: str, neutral: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens carry label −100; the completion is the neutral text + EOS."""
    prompt = lm.encode(build_prompt(lm, biased))
    completion = lm.tokenizer(" " + neutral if not lm.use_chat_template else neutral,
                              add_special_tokens=False).input_ids + [eos_id(lm)]
    return prompt + completion, [-100] * len(prompt) + completion


def encode_pairs(lm, pairs, max_length: int, *, kept_sources: dict | None = None):
    """Encoded examples no longer than ``max_length`` tokens, and the number skipped as too long
    (``kept_sources``, when given, is filled with the count of kept examples per source)."""
    out, skipped = [], 0
    for p in pairs:
        ids, labels = encode_example(lm, p.biased, p.neutral)
        if len(ids) > max_length:
            skipped += 1
            continue
        out.append((ids, labels))
        if kept_sources is not None:
            kept_sources[p.source] = kept_sources.get(p.source, 0) + 1
    return out, skipped


def collate(examples, pad_id: int):
    """Right-padded batch: input_ids, attention_mask, position_ids, labels (−100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
        mask[r, :len(x)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def completion_loss(lm, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over completion tokens only (labels != −100); the LM head runs only at
    the positions that predict them. Returns (loss, number of target tokens)."""
    labels = batch["labels"].to(lm.device)
    target = labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)  # position t predicts token t+1
    if rows.numel() == 0:
        raise BiaslabError("a training batch has no completion tokens")
    logits = lm.logits_at(batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device),
                          batch["position_ids"].to(lm.device), rows, cols)
    return F.cross_entropy(logits, target[rows, cols]), int(rows.numel())


# ---------------------------------------------------------------------------------------------- peft LoRA
def inject_lora(model, cfg: SRLLMConfig) -> dict[str, torch.nn.Module]:
    """Inject peft LoRA layers into ``model`` in place (seeded init); only LoRA weights require grad.
    Returns {module path: peft LoRA layer}. Undo with :func:`remove_lora`."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise BiaslabError(f"LoRA target module(s) {', '.join(missing)} not found in this model; "
                           f"its Linear layers are named: {', '.join(sorted(names))}")
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none")
    inject_adapter_in_model(lcfg, model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return layers


def remove_lora(model) -> None:
    """Put every peft LoRA layer's original ``base_layer`` module back (the very same module object)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
    if hasattr(model, "peft_config"):  # set by inject_adapter_in_model
        del model.peft_config


def lora_weights(layers: dict[str, torch.nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in layers.items()}


def _load_lora_weights(layers, weights) -> None:
    with torch.no_grad():
        for n, (a, b) in weights.items():
            layers[n].lora_A["default"].weight.copy_(a)
            layers[n].lora_B["default"].weight.copy_(b)


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


@torch.no_grad()
def validation_loss(lm, examples, batch_size: int) -> float:
    total = count = 0.0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for k in range(0, len(order), batch_size):
        loss, n = completion_loss(lm, collate([examples[i] for i in order[k:k + batch_size]], lm.pad_id))
        total += float(loss) * n
        count += n
    return total / count if count else math.nan


@dataclass
class TrainResult:
    patch: "LoraPatch"
    history: dict = field(default_factory=dict)


def train_lora(lm, train_pairs, val_pairs, cfg: SRLLMConfig | None = None, *, progress: bool | None = None,
               provenance: dict | None = None, max_steps: int | None = None, log=None) -> TrainResult:
    """Fit a LoRA rewriter on ``train_pairs`` with early stopping on ``val_pairs`` (lists of RewritePair).

    ``lm.model`` is left exactly as it was (adapter removed, requires_grad flags and train/eval mode restored)."""
    cfg = cfg or SRLLMConfig()
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

        with progress_bar(total_steps, "SR_LLM LoRA training", unit="steps", enabled=progress) as advance:
            model.train()
            epoch = 0
            while step < total_steps and not stopped_early:
                for b in _batches(len(train), cfg.batch_size, lengths, rng):
                    if step >= total_steps:
                        break
                    batch = collate([train[i] for i in b], lm.pad_id)
                    loss, n_tok = completion_loss(lm, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    step += 1
                    history["train_tokens"] += int(batch["attention_mask"].sum())
                    history["train_loss"].append(float(loss.detach()))
                    info = {"loss": history["train_loss"][-1]}
                    if step % cfg.eval_every == 0 or step == total_steps:
                        stopped_early = check(step) and step < total_steps
                        if history["val_loss"]:
                            info["val"] = history["val_loss"][-1]["loss"]
                    advance(1, **info)
                    if stopped_early:
                        break
                epoch += 1
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
            **{k: v for k, v in history.items() if k not in ("train_loss", "val_loss")}, **(provenance or {})}
    patch = LoraPatch.from_weights(lm, weights, params=params_, provenance=prov)
    return TrainResult(patch, history)


# ---------------------------------------------------------------------------------------------- the patch
class LoraPatch(Patch):
    """SR_LLM's result: LoRA matrices per target Linear layer. Tensors ``lora_A.<module path>`` (r × in) and
    ``lora_B.<module path>`` (out × r); params hold r, alpha, scale (= alpha / r), dropout and targets.

    Applied with forward hooks adding ``scale · B(A(x))`` to each target layer's output (no weight is touched,
    so removing the hooks restores the model bit-for-bit); exported by merging ``W += scale · B @ A``."""

    kind = "lora"

    @classmethod
    def from_weights(cls, lm, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], *, params: dict,
                     provenance: dict | None = None) -> "LoraPatch":
        tensors = {}
        for name, (a, b) in weights.items():
            tensors[f"lora_A.{name}"] = a.detach().float().cpu()
            tensors[f"lora_B.{name}"] = b.detach().float().cpu()
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec, params=params, provenance=provenance,
                   tensors=tensors)

    @property
    def scale(self) -> float:
        if "scale" in self.params:
            return float(self.params["scale"])
        return float(self.params["alpha"]) / float(self.params["r"])

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for k, a in self.tensors.items():
            if k.startswith("lora_A."):
                name = k[len("lora_A."):]
                b = self.tensors.get(f"lora_B.{name}")
                if b is None:
                    raise BiaslabError(f"corrupt lora patch: lora_A.{name} has no matching lora_B.{name}")
                out[name] = (a, b)
        if not out:
            raise BiaslabError("corrupt lora patch: it holds no lora_A/lora_B tensors")
        return out

    def _targets(self, model) -> list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]]:
        found = []
        for name, (a, b) in self.modules().items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise BiaslabError(f"the lora patch targets module {name!r}, which this model does not have") from None
            if not isinstance(mod, torch.nn.Linear):
                raise BiaslabError(f"the lora patch targets {name!r}, which is a {type(mod).__name__}, not a Linear layer")
            if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features or a.shape[0] != b.shape[1]:
                raise BiaslabError(f"lora patch shapes for {name!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not "
                                   f"fit a Linear {mod.in_features}→{mod.out_features}")
            w = mod.weight
            found.append((name, mod, a.to(w.device, w.dtype), b.to(w.device, w.dtype)))
        return found

    def _apply(self, lm):
        scale = self.scale
        handles = []
        for _, mod, a, b in self._targets(lm.model):
            def hook(module, args, output, a=a, b=b):
                return output + scale * F.linear(F.linear(args[0].to(a.dtype), a), b).to(output.dtype)
            handles.append(mod.register_forward_hook(hook))
        self._hook_ids = {h.id for h in handles}

        def undo():
            for h in handles:
                h.remove()
        return undo

    def _export_model(self, lm):
        """A merged copy of the base model: ``W + scale · B @ A`` on each target layer, no hooks."""
        base = copy.deepcopy(lm.model)
        for m in base.modules():  # drop the copied adapter hooks; the merge replaces them
            for hid in getattr(self, "_hook_ids", ()):
                m._forward_hooks.pop(hid, None)
        scale = self.scale
        with torch.no_grad():
            for _, mod, a, b in self._targets(base):
                mod.weight += scale * (b.double() @ a.double()).to(mod.weight.dtype)
        return base

    def merged_model(self, lm):
        """The merged model as a new module (the base ``lm`` is untouched)."""
        self.check_base(lm)
        with self.applied(lm):
            return self._export_model(lm)


# ---------------------------------------------------------------------------------------------- rewriting
@dataclass
class RewriteOutput:
    rewrites: list[str]
    notices: list[str]
    max_new_tokens: list[int]


def rewrite(lm, texts: list[str], *, patch: Patch | None = None, max_input_tokens: int = 256,
            max_new_cap: int = 256, on_long: str = "truncate", desc: str = "rewriting") -> RewriteOutput:
    """Greedy rewrites of ``texts`` with the SR_LLM prompt (optionally under ``patch``).

    max_new_tokens per text = min(max_new_cap, 1.5 × input tokens + 16). Empty text → error. A text longer than
    ``max_input_tokens`` is cut to that many tokens with a notice (``on_long="error"`` raises instead)."""
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
        limits.append(min(max_new_cap, int(1.5 * len(ids)) + 16))
    out: list[str] = [""] * len(texts)
    buckets: dict[int, list[int]] = {}
    for i, lim in enumerate(limits):  # one generate call per 16-token bucket of length limits
        limits[i] = min(max_new_cap, 16 * math.ceil(lim / 16))
        buckets.setdefault(limits[i], []).append(i)
    import contextlib

    ctx = patch.applied(lm) if patch is not None else contextlib.nullcontext()
    with ctx:
        for lim, idx in sorted(buckets.items()):
            gens = lm.generate([build_prompt(lm, prepared[i]) for i in idx], max_new_tokens=lim, desc=desc)
            for i, g in zip(idx, gens):
                out[i] = g
    return RewriteOutput(out, notices, limits)


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


def compare_rewriters(before: list[dict], after: list[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{metric: {before, after, delta, delta_ci95, p, ...}} for every rewrite metric (paired bootstrap over pairs)."""
    from .. import stats
    from ..metrics.rewrite import REWRITE_METRICS
    from ..runs import clean_nan

    out = {}
    for name, (fn, scale, higher, desc) in REWRITE_METRICS.items():
        if name == "content_preservation" and any(r.get("cosine") is None for r in before + after):
            continue
        out[name] = {**stats.paired_bootstrap(before, after, fn, n_boot=n_boot, seed=seed), "scale": scale,
                     "higher_is_better": higher, "description": desc}
    return clean_nan(out)


def metrics_by(records: list[dict], field_: str = "source") -> dict:
    from ..metrics.rewrite import REWRITE_METRICS
    from ..stats import _safe

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r[field_], []).append(r)
    return {g: {"n": len(rs), **{n: _safe(fn, rs) for n, (fn, *_rest) in REWRITE_METRICS.items()
                                 if n != "content_preservation" or all(r.get("cosine") is not None for r in rs)}}
            for g, rs in sorted(groups.items())}


RETENTION_BENCHES = ("stereoset", "crows", "retention")


def retention_audit(lm, patch: Patch, *, benches=RETENTION_BENCHES, limit: int | None = 200, seed: int = 0,
                    n_boot: int = 1000, out=None) -> dict:
    """The audit's likelihood benchmarks and held-out perplexity without and with the adapter, with paired-bootstrap
    deltas per metric. Writes ``out/before`` and ``out/after`` audit run directories when ``out`` is given."""
    from pathlib import Path

    from .. import stats
    from ..audit import audit
    from ..benchmarks import get_benchmark
    from ..runs import clean_nan

    kw = dict(limit=limit, seed=seed, n_boot=n_boot)
    before = audit(lm, list(benches), out=Path(out) / "before" if out else None, **kw)
    after = audit(lm, list(benches), patch=patch, out=Path(out) / "after" if out else None, **kw)
    metrics = {}
    for b in benches:
        bench = get_benchmark(b)
        proto = bench.protocol(before.results["benchmarks"][b]["protocol"])
        for m in bench.metric_defs(proto):
            d = stats.paired_bootstrap(before.records[b], after.records[b], m.fn, n_boot=n_boot, seed=seed)
            metrics[f"{b}.{m.name}"] = {**d, "scale": m.scale, "protocol": proto.id, "description": m.description}
    return clean_nan({"limit": limit, "seed": seed, "metrics": metrics,
                      "n_items": {b: before.results["benchmarks"][b]["n_items"] for b in benches}})


# ---------------------------------------------------------------------------------------------- the pipeline
def mitigate(model="smollm2-135m-instruct", out=None, *, cfg: SRLLMConfig | None = None, train_limit: int | None = 640,
             val_limit: int | None = 96, eval_limit: int | None = 100, retention_limit: int | None = 200,
             retention: bool = True, split_seed: int = 0, n_boot: int = 1000, force: bool = False,
             progress: bool | None = None, log=print) -> dict:
    """``biaslab mitigate srllm``: train the LoRA rewriter, evaluate tuned vs untuned on held-out test pairs,
    audit retention before/after, write ``out/{patch.safetensors, summary.json, rewrites.jsonl, report.html}``.

    Test pairs are only used for the final evaluation (never for early stopping or model choice)."""
    from pathlib import Path

    from ..metrics.rewrite import SentenceEmbedder
    from ..models import LanguageModel, load_model
    from ..runs import RunDir, Timer, atomic_write_json, atomic_write_text, clean_nan
    from . import srllm_data as sd

    cfg = cfg or SRLLMConfig()
    for flag, v in (("--train-limit", train_limit), ("--val-limit", val_limit), ("--eval-limit", eval_limit),
                    ("--retention-limit", retention_limit)):
        if v is not None and v <= 0:
            raise BiaslabError(f"{flag} must be a positive number, got {v}")
    lm = model if isinstance(model, LanguageModel) else load_model(model)
    splits = sd.load_splits(seed=split_seed)
    train_pairs = sd.sample_pairs(splits["train"], train_limit, seed=cfg.seed)
    val_pairs = sd.sample_pairs(splits["validation"], val_limit, seed=cfg.seed)
    test_pairs = sd.sample_pairs(splits["test"], eval_limit, seed=cfg.seed)
    args = {"method": "srllm", "task": "debias_rewrites", "model": lm.spec, "fingerprint": lm.fingerprint,
            "config": cfg.to_dict(), "train_limit": train_limit, "val_limit": val_limit, "eval_limit": eval_limit,
            "retention_limit": retention_limit if retention else None, "split_seed": split_seed, "n_boot": n_boot,
            "protocol": PROTOCOL_ID}
    run = RunDir(out, args, force=force, extra_manifest={"model": lm.describe(), "data_sha256": sd.data_files_sha256(),
                                                          "data": sd.data_stats(seed=split_seed)}) if out else None
    timings = {}
    path = Path(out) if out else None

    # 1. train (reuse a finished patch of this same run)
    t = Timer()
    patch_file = path / "patch.safetensors" if path else None
    history = None
    old = json.loads((path / "history.json").read_text()) if path and (path / "history.json").is_file() else None
    if old is not None and old.get("run_args") == run.args and patch_file.is_file():
        from ..patches import load_patch

        patch, history = load_patch(patch_file), old
        patch.check_base(lm)
        log(f"reusing the adapter trained by this run: {patch_file}")
    else:
        log(f"training LoRA on {len(train_pairs)} pairs (validation {len(val_pairs)}), config {cfg.to_dict()}")
        res = train_lora(lm, train_pairs, val_pairs, cfg, progress=progress, log=log,
                         provenance={"split_seed": split_seed, "train_limit": train_limit,
                                     "train_sources": dict(_count(p.source for p in train_pairs))})
        patch, history = res.patch, res.history
        if path:
            patch.save(patch_file)
            atomic_write_json(path / "history.json", clean_nan({**history, "run_args": run.args}))
    timings["train"] = history.get("train_seconds", t.elapsed())

    # 2. rewrite evaluation on test pairs: untuned vs tuned, same prompt; copy-input control
    t = Timer()
    embedder = SentenceEmbedder()
    untuned = evaluate_rewriter(lm, test_pairs, embedder=embedder, desc="rewriting (untuned)")
    tuned = evaluate_rewriter(lm, test_pairs, patch=patch, embedder=embedder, desc="rewriting (tuned)")
    copy_ctl = with_cosines([{**r, "rewrite": r["biased"]} for r in untuned], embedder)
    rewrite_cmp = compare_rewriters(untuned, tuned, n_boot=n_boot, seed=cfg.seed)
    control_cmp = compare_rewriters(copy_ctl, tuned, n_boot=n_boot, seed=cfg.seed)
    timings["rewrite_eval"] = t.elapsed()
    if path:
        lines = [json.dumps({k: u[k] for k in ("id", "source", "dimension", "biased", "reference")} |
                            {"untuned": u["rewrite"], "tuned": a["rewrite"], "cosine_untuned": u.get("cosine"),
                             "cosine_tuned": a.get("cosine")}) for u, a in zip(untuned, tuned)]
        atomic_write_text(path / "rewrites.jsonl", "".join(x + "\n" for x in lines))

    # 3. retention audit
    ret = None
    if retention:
        t = Timer()
        ret = retention_audit(lm, patch, limit=retention_limit, seed=cfg.seed, n_boot=n_boot, out=path)
        timings["retention_audit"] = t.elapsed()

    metrics = {f"rewrite.{k}": v for k, v in rewrite_cmp.items()}
    if ret:
        metrics.update(ret["metrics"])
    summary = clean_nan({
        "method": "srllm", "task": "debias_rewrites", "protocol": PROTOCOL_ID,
        "model": {"spec": lm.spec, "fingerprint": lm.fingerprint},
        "patch": patch.describe(),
        "before_after": "before = the untuned base model, after = base + LoRA adapter; rewrite metrics on "
                        f"{len(test_pairs)} held-out test pairs, retention on the audit benchmarks",
        "metrics": metrics,
        "control": {"kind": "copy-input", "description": "the input returned unchanged, compared with the tuned "
                    "rewriter (before = copy, after = tuned)", "metrics": control_cmp},
        "by_source": {"untuned": metrics_by(untuned), "tuned": metrics_by(tuned), "copy_input": metrics_by(copy_ctl)},
        "data": {"n_train": history["n_train"], "n_train_skipped_too_long": history["n_train_skipped_too_long"],
                 "n_validation": history["n_val"], "n_test": len(test_pairs),
                 "sampled_train_sources": dict(_count(p.source for p in train_pairs)),
                 "n_train_by_source": history.get("n_train_by_source"),
                 "test_sources": dict(_count(p.source for p in test_pairs)), "split_seed": split_seed},
        "training": {k: v for k, v in history.items() if k not in ("train_loss", "run_args")},
        "retention": {k: v for k, v in (ret or {}).items() if k != "metrics"} or None,
        "timings_s": timings,
    })
    if path:
        atomic_write_json(path / "summary.json", summary)
        write_report(summary, history, tuned, untuned, path / "report.html")
        run.finish(timings_s=timings)
    return summary


def _count(it):
    from collections import Counter

    return Counter(it)


def write_report(summary: dict, history: dict, tuned: list[dict], untuned: list[dict], path) -> None:
    from ..report import esc, figure, fmt, fmt_ci, table, write_page

    def rows(metrics: dict, names=None):
        out = []
        for name, m in metrics.items():
            if names and not any(name.startswith(n) for n in names):
                continue
            d = m.get("delta")
            out.append([name, fmt(m.get("before")), fmt(m.get("after")), fmt(d), fmt_ci(m.get("delta_ci95")),
                        fmt(m.get("p")), m.get("scale", "")])
        return out

    hdr = ["metric", "before", "after", "Δ", "Δ 95% CI (paired bootstrap)", "p", "scale"]
    sections = [("Rewriting held-out test pairs: untuned (before) vs tuned (after)",
                 table(hdr, rows(summary["metrics"], ["rewrite."])) +
                 f"<p class='note'>{esc(summary['before_after'])}. Protocol {esc(summary['protocol'])}.</p>"),
                ("Control: copying the input (before) vs tuned (after)", table(hdr, rows(summary["control"]["metrics"])))]
    if summary.get("retention"):
        sections.append(("Retention: audit without (before) and with (after) the adapter",
                         table(hdr, rows({k: v for k, v in summary["metrics"].items() if not k.startswith("rewrite.")}))))
    by = summary["by_source"]
    names = ["chrf", "bleu", "removal_rate", "exact_match", "copy_rate", "content_preservation"]
    src_rows = [[s, by["tuned"][s]["n"]] + [f"{fmt(by['untuned'][s].get(n))} → {fmt(by['tuned'][s].get(n))}"
                                          for n in names] for s in by["tuned"]]
    sections.append(("By source (untuned → tuned)", table(["source", "n"] + names, src_rows)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], lw=0.8, label="train (batch)")
        if history.get("val_loss"):
            ax.plot([v["step"] for v in history["val_loss"]], [v["loss"] for v in history["val_loss"]], "o-",
                    label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("completion loss")
        ax.legend()
        sections.append(("Training", figure(fig, alt="loss curves") +
                         f"<p class='note'>{esc({k: v for k, v in summary['training'].items() if k != 'val_loss'})}</p>"))
    except ImportError:
        pass
    ex = [[u["source"], u["biased"], u["reference"], u["rewrite"], t["rewrite"]] for u, t in list(zip(untuned, tuned))[:15]]
    sections.append(("Examples", table(["source", "input", "reference", "untuned", "tuned"], ex)))
    sections.append(("Patch", f"<pre>{esc(json.dumps(summary['patch'], indent=1)[:4000])}</pre>"))
    write_page(path, "biaslab mitigate srllm", sections,
               subtitle=f"model {summary['model']['spec']} — SR_LLM LoRA rewriter (Raza et al. 2024)")
