"""Soft-prompt tuning to evaluate bias (Tian et al. 2023, arXiv 2306.04735; Lester et al. 2021; docs/methods/softprompt.md).

A frozen causal LM gets k trainable input vectors (peft's prompt-tuning encoder, ``PromptTuningConfig(task_type=
"CAUSAL_LM", prompt_tuning_init=SAMPLE_VOCAB)``) prepended to ``"<sentence> Sentiment:"``; the label word
(`` negative`` / `` neutral`` / `` positive``, first token) is scored as the next token. The same scorer runs the
hand-written prompts, so the only thing that differs between the soft-prompt and the hand-written probes is the
prompt.

Choices (the paper leaves them open; deviations from a stock peft training loop are named):
- **Input format**: ``[P1..Pk]<sentence> Sentiment:`` — instruction-free; no chat template, no BOS.
- **Loss**: cross-entropy over the 3 label tokens' logits only (a softmax restricted to the label words); the
  prediction is the argmax over the same 3 logits, for soft and hand-written prompts alike.
- **Forward pass**: we use peft's ``PromptEmbedding`` module and config but our own forward instead of
  ``PeftModel.forward``: the k prompt vectors run through the model once per batch, their key/value cache is
  repeated over the batch, and the LM head runs on the 3 label rows at the last position only. Numerically this
  is the same function as prepending the vectors to every row (a test checks it) at ~half the CPU cost.
- **Training**: AdamW (no weight decay), constant learning rate, gradient-norm clip 1.0, batches of sentences of
  similar length (seeded), SST-5→3 classes on a seeded subsample of the train split (natural class mix), the
  sentence truncated to ``max_length`` tokens. Selection by accuracy on a seeded subsample of the dev split. The
  test split is never used for any choice.
- **Sweep**: seeds × learning rates; the top R runs by validation accuracy are kept (ties: lower lr, lower seed).
- **Cache**: a trained prompt is one small ``.safetensors`` file (tensor ``prompt_embeddings``; metadata: peft
  config, training config, base fingerprint, validation accuracy, loss curve), keyed by the base fingerprint,
  hyper-parameters, seed and data sizes, and never retrained when present.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import BiaslabError, PatchMismatchError
from ..models.finite import refuse_nan
from ..models.head import float32_head, wanted_columns
from ..progress import progress_bar

PROTOCOL_VERSION = "softprompt.v1"
SOFT_LABEL_WORDS = (" negative", " neutral", " positive")
SOFT_TEMPLATE = "{sentence} Sentiment:"
FILE_KIND = "soft-prompt"


# ---------------------------------------------------------------- prompts
@dataclass(frozen=True)
class HandPrompt:
    """A hand-written zero-shot prompt: ``template`` holds ``{sentence}``; ``chat`` wraps it in the tokenizer's
    chat template (user turn; the answer is the assistant's first token)."""
    name: str
    template: str
    label_words: tuple[str, str, str] = SOFT_LABEL_WORDS
    chat: bool = False

    @property
    def id(self) -> str:
        return f"hand:{self.name}"


HAND_PROMPTS: tuple[HandPrompt, ...] = (
    HandPrompt("bare", SOFT_TEMPLATE),  # the soft prompt's own format with no prompt vectors
    HandPrompt("question", "Is the sentiment of this sentence negative, neutral or positive?\nSentence: {sentence}\nAnswer:"),
    HandPrompt("review", "Classify the review as negative, neutral or positive.\nReview: {sentence}\nThe review is"),
    HandPrompt("chat", "What is the sentiment of this sentence? Answer with one word: negative, neutral or positive.\n\n"
                       "{sentence}", label_words=("negative", "neutral", "positive"), chat=True),
)


def hand_prompt(name: str) -> HandPrompt:
    for p in HAND_PROMPTS:
        if name in (p.name, p.id):
            return p
    from ..errors import UnknownNameError

    raise UnknownNameError("hand-written prompt", name, [p.name for p in HAND_PROMPTS])


@dataclass(frozen=True)
class SoftPromptConfig:
    """Everything that determines a trained soft prompt (with the base fingerprint and the data file hashes)."""
    virtual_tokens: int = 8
    lr: float = 1e-2
    seed: int = 0
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 64          # sentence tokens kept (the format's own tokens come on top)
    train_limit: int | None = 384
    val_limit: int | None = 150
    data_seed: int = 0            # which train / dev sentences (shared by every run of a sweep)
    init: str = "SAMPLE_VOCAB"
    template: str = SOFT_TEMPLATE
    label_words: tuple[str, str, str] = SOFT_LABEL_WORDS
    clip: float = 1.0

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise BiaslabError(f"--virtual-tokens must be ≥ 1, got {self.virtual_tokens}")
        if not self.lr > 0:
            raise BiaslabError(f"learning rate must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise BiaslabError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("train_limit", "val_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise BiaslabError(f"{name} must be a positive number of sentences, got {v}")
        if "{sentence}" not in self.template:
            raise BiaslabError("the soft-prompt input template must contain {sentence}")

    def key(self, fingerprint: str, data_sha: str, micro_batch_size: int | None = None,
            dtype: str | None = None) -> str:
        """The cache key; a prompt trained in parts (``micro_batch_size``) or on a model loaded in another dtype
        than float32 (``LanguageModel.identity``) is its own entry."""
        blob = json.dumps({"v": PROTOCOL_VERSION, "base": fingerprint, "data": data_sha, **asdict(self),
                           **({"micro_batch_size": micro_batch_size} if micro_batch_size else {}),
                           **({"dtype": dtype} if dtype else {})}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def name(self) -> str:
        return f"soft-lr{self.lr:g}-s{self.seed}"


@dataclass(eq=False)
class SoftPrompt:
    """A trained soft prompt: ``embeddings`` [k, hidden] plus its config and provenance."""
    embeddings: torch.Tensor
    config: SoftPromptConfig
    base_fingerprint: str
    base_spec: str = ""
    val_accuracy: float = math.nan
    info: dict = field(default_factory=dict)   # loss curve, n_train, seconds, cache key, ...

    @property
    def id(self) -> str:
        return self.config.name

    @property
    def label_words(self):
        return self.config.label_words

    def check_base(self, lm) -> None:
        if lm.fingerprint != self.base_fingerprint:
            raise PatchMismatchError(
                f"soft prompt {self.id} was trained on base model {self.base_spec or '?'} ({self.base_fingerprint}), "
                f"not on the loaded {lm.spec} ({lm.fingerprint}); retrain it for this model.")
        if self.embeddings.shape[-1] != lm.model.get_input_embeddings().embedding_dim:
            raise BiaslabError(f"soft prompt {self.id} has width {self.embeddings.shape[-1]}, the model "
                               f"{lm.model.get_input_embeddings().embedding_dim}")

    def save(self, path) -> Path:
        """One small safetensors file (atomic write)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": asdict(self.config), "base_fingerprint": self.base_fingerprint, "base_spec": self.base_spec,
                "val_accuracy": self.val_accuracy, "info": self.info, "protocol": PROTOCOL_VERSION,
                "peft_config": self.info.get("peft_config")}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"prompt_embeddings": self.embeddings.detach().cpu().float().contiguous()}, str(tmp),
                  metadata={"biaslab.kind": FILE_KIND, "biaslab.meta": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "SoftPrompt":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BiaslabError(f"soft prompt file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("prompt_embeddings")
        except Exception as e:  # safetensors raises its own error types
            raise BiaslabError(f"{path} is not a readable soft-prompt file: {e}") from None
        if meta.get("biaslab.kind") != FILE_KIND:
            raise BiaslabError(f"{path} is not a biaslab soft-prompt file (kind {meta.get('biaslab.kind')!r})")
        m = json.loads(meta["biaslab.meta"])
        cfg = m["config"]
        cfg["label_words"] = tuple(cfg["label_words"])
        return cls(emb, SoftPromptConfig(**cfg), m["base_fingerprint"], m.get("base_spec", ""),
                   m.get("val_accuracy", math.nan) if m.get("val_accuracy") is not None else math.nan, m.get("info", {}))


# ---------------------------------------------------------------- scoring engine
def _label_ids(lm, words) -> list[int]:
    ids = [lm.candidate_token_id(w) for w in words]
    if len(set(ids)) != len(ids):
        raise BiaslabError(f"label words {list(words)} share a first token under this tokenizer; choose others")
    return ids


def _split_template(lm, prompt) -> tuple[str, str]:
    """(prefix, suffix) text around ``{sentence}``; a chat prompt is rendered with the chat template first.
    A space before ``{sentence}`` moves into the sentence piece."""
    text = prompt.template
    if getattr(prompt, "chat", False) and getattr(lm.tokenizer, "chat_template", None) is not None:
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
    prefix, _, suffix = text.partition("{sentence}")
    return prefix, suffix


@dataclass
class _Encoded:
    prefix_ids: list[int]
    rows: list[list[int]]
    label_ids: list[int]


def encode(lm, prompt, sentences: list[str], max_length: int = 64) -> _Encoded:
    """Token ids: the prompt's prefix once, then per sentence ``ids(sentence)[:max_length] + ids(suffix)``
    (pieces tokenised separately, so every prompt cuts the text the same way)."""
    prefix, suffix = _split_template(lm, prompt)
    lead = ""
    if prefix.endswith(" "):
        prefix, lead = prefix.rstrip(" "), " "
    tok = lm.tokenizer
    pre = tok(prefix, add_special_tokens=False).input_ids if prefix else []
    suf = tok(suffix, add_special_tokens=False).input_ids if suffix else []
    rows = []
    for s in sentences:
        ids = tok(lead + s, add_special_tokens=False).input_ids[:max_length] + suf
        if not ids:
            raise BiaslabError(f"sentence {s!r} encodes to no tokens")
        rows.append(ids)
    return _Encoded(pre, rows, _label_ids(lm, prompt.label_words))


def _cache_name(body) -> str:
    """The key/value cache's argument and output name: ``cache`` from transformers 5.24 (``past_key_values``,
    deprecated there, goes in 5.40), ``past_key_values`` before."""
    import inspect

    for cls in type(body).__mro__:   # a subclass whose forward takes **kwargs names neither: ask the class it extends
        params = inspect.signature(cls.forward).parameters if "forward" in vars(cls) else {}
        if "cache" in params or "past_key_values" in params:
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


def label_logits(lm, prefix, rows: list[list[int]], label_ids: list[int]) -> torch.Tensor:
    """Logits [B, n_labels] of the label tokens at each row's last position, after ``prefix`` + row.

    ``prefix``: None / empty, a LongTensor of token ids [k], or a float tensor of input embeddings [k, d] (the
    soft prompt; gradients flow into it). The prefix runs once (batch 1) and its key/value cache is repeated over
    the batch; rows are right-padded and get positions k, k+1, ... Gradients flow when grad mode is on."""
    m = lm.model
    dev = lm.device
    B = len(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((B, width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    split = lm._use_head_split()
    body = m.base_model if split else m
    k, cache, cache_name = 0, None, _cache_name(body)
    if prefix is not None and len(prefix):
        k = prefix.shape[0]
        if prefix.is_floating_point():
            kw = {"inputs_embeds": prefix[None].to(device=dev, dtype=lm.dtype)}
        else:
            kw = {"input_ids": prefix[None].to(dev)}
        cache = getattr(body(**kw, use_cache=True), cache_name)
        cache.batch_repeat_interleave(B)
    full_mask = torch.cat([torch.ones((B, k), dtype=torch.long, device=dev), mask], dim=1)
    pos = k + (mask.cumsum(-1) - 1).clamp(min=0)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    keep_kw, at, kept = ({}, last, -1) if split else wanted_columns(m, last)
    with nullcontext() if split else float32_head(m.get_output_embeddings()):
        out = body(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=cache is not None,
                   **{cache_name: cache}, **keep_kw)
    rows_ix = torch.arange(B, device=dev)
    lab = torch.tensor(label_ids, device=dev)
    if split:   # under a device map the last hidden states and the head may sit on other GPUs than the inputs
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        head, hd = m.get_output_embeddings(), hidden.device
        # in float32 (three rows of the head): bf16 logits tie the labels (models.lm.head_logits)
        logits = hidden[rows_ix.to(hd), last.to(hd)].float() @ head.weight[lab.to(head.weight.device)].to(hd).float().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[lab.to(head.bias.device)].to(hd).float()
        if lm.after_head is not None:   # the model's own soft-cap or scale (models.head.after_head)
            logits = lm.after_head(logits)
    else:   # the model's own forward: the rows' last columns only, their head output in float32 outside autograd
        lg = out.logits
        at = at if lg.shape[1] == kept else last   # a forward that ignored logits_to_keep: every column
        logits = lg[rows_ix.to(lg.device), at.to(lg.device)][:, lab.to(lg.device)]
    return logits.float().to(dev)


def _prefix_tensor(lm, prompt, enc: _Encoded):
    if isinstance(prompt, SoftPrompt):
        return prompt.embeddings
    return torch.tensor(enc.prefix_ids, dtype=torch.long) if enc.prefix_ids else None


@torch.no_grad()
def predict(lm, prompt, sentences: list[str], *, max_length: int = 64, batch_size: int = 32, desc: str = "scoring",
            progress: bool | None = None) -> list[dict]:
    """``[{"pred": 0|1|2, "logprobs": [3 floats]}]`` (log-softmax over the 3 label logits) per sentence, for a
    :class:`SoftPrompt` or a :class:`HandPrompt`. Batches of similar length; results in input order."""
    if isinstance(prompt, SoftPrompt):
        prompt.check_base(lm)
        tmpl = prompt.config
        max_length = tmpl.max_length
        enc = encode(lm, tmpl, sentences, max_length)
    else:
        enc = encode(lm, prompt, sentences, max_length)
    prefix = _prefix_tensor(lm, prompt, enc)
    order = sorted(range(len(sentences)), key=lambda i: (-len(enc.rows[i]), i))
    out: list[dict] = [None] * len(sentences)  # type: ignore[list-item]
    with progress_bar(len(sentences), desc, enabled=lm.progress if progress is None else progress) as advance:
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            lp = refuse_nan(torch.log_softmax(label_logits(lm, prefix, [enc.rows[i] for i in batch], enc.label_ids), -1),
                            lm.spec, lm.dtype).cpu()
            for j, i in enumerate(batch):
                row = lp[j].tolist()
                out[i] = {"pred": max(range(len(row)), key=lambda c: (row[c], -c)), "logprobs": [round(x, 5) for x in row]}
            advance(len(batch))
    return out


def accuracy(preds: list[dict], gold: list[int]) -> float:
    return sum(int(p["pred"] == g) for p, g in zip(preds, gold)) / len(gold) if gold else math.nan
