"""SR_LLM (Raza et al. 2024, arXiv 2404.01399; docs/methods/srllm.md): LoRA instruction fine-tuning that teaches a
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
  :mod:`.data`. Examples longer than ``max_length`` tokens are skipped (counted), so no completion is ever cut.
- The training loop, and its data parallelism over processes, is :mod:`.training`.

The result is a :class:`LoraPatch` (kind ``lora``): applied by forward hooks adding ``scale·B·A·x`` to the
target Linear layers (weights untouched, so removal is exact) and exported by merging ``W += scale·B·A``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...interventions import Hooks, Intervention
from ...errors import BiaslabError
from ...patches import Patch
from .config import INSTRUCTION, SYSTEM_PROMPT, SRLLMConfig

# ---------------------------------------------------------------------------------------------- prompts
def build_prompt(lm, text: str) -> str:
    """The prompt the rewriter sees: chat template, system message, instruction with the text."""
    return lm.render(INSTRUCTION.format(text=text), system=SYSTEM_PROMPT, cue=REWRITE_CUE)


REWRITE_CUE = "Rewritten text:"   # a base model's boundary between prompt and completion (no chat template)


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

    from ...models.sites import lora_targets

    targets = list(cfg.target_modules or lora_targets(model))   # default: the family's, from the sites table
    # GPT-2's linear layers are Conv1D (weight stored in × out): peft adapts them with fan_in_fan_out
    is_lin = lambda m: isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"  # noqa: E731
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_lin(m)}
    conv1d = any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    missing = [t for t in targets if t not in names]
    if missing:
        raise BiaslabError(f"LoRA target module(s) {', '.join(missing)} not found in this model; "
                           f"its Linear layers are named: {', '.join(sorted(names))}")
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias="none", fan_in_fan_out=conv1d)
    inject_adapter_in_model(lcfg, model)
    # peft gives the adapters the base layer's dtype; on a bf16/fp16 model (the GPU default) they are trained in
    # float32, as peft's own get_peft_model does (autocast_adapter_dtype): Adam's small updates on bf16 weights
    # round away. peft's LoRA forward casts the input to the adapter's dtype and the sum back to the layer's.
    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:   # an older peft: the same upcast by hand
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n and p.dtype in (torch.bfloat16, torch.float16):
                    p.data = p.data.float()
    else:
        cast_adapter_dtype(model, "default")
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

    def validate(self) -> "LoraPatch":
        mods = self.modules()   # every lora_A has its lora_B
        for k in self.tensors:
            if not (k.startswith("lora_A.") or k.startswith("lora_B.")):
                raise BiaslabError(f"lora patch: unexpected tensor {k!r}")
            if k.startswith("lora_B.") and k[len("lora_B."):] not in mods:
                raise BiaslabError(f"corrupt lora patch: {k} has no matching lora_A")
        for name, (a, b) in mods.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not (a.is_floating_point() and b.is_floating_point()):
                raise BiaslabError(f"lora patch: {name} needs float A (r × in) and B (out × r), got A {tuple(a.shape)}, "
                                   f"B {tuple(b.shape)}")
        try:
            s = self.scale
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise BiaslabError("lora patch: params need 'scale' or 'alpha' and 'r'") from None
        if not s == s:
            raise BiaslabError("lora patch: the scale is NaN")
        return self

    def _targets(self, model) -> list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]]:
        found = []
        for name, (a, b) in self.modules().items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise BiaslabError(f"the lora patch targets module {name!r}, which this model does not have") from None
            conv1d = type(mod).__name__ == "Conv1D"   # GPT-2's linear layer, weight stored (in, out)
            if not (isinstance(mod, torch.nn.Linear) or conv1d):
                raise BiaslabError(f"the lora patch targets {name!r}, which is a {type(mod).__name__}, not a Linear layer")
            n_in, n_out = (mod.weight.shape[0], mod.weight.shape[1]) if conv1d else (mod.in_features, mod.out_features)
            if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
                raise BiaslabError(f"lora patch shapes for {name!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not "
                                   f"fit a Linear {n_in}→{n_out}")
            w = mod.weight
            found.append((name, mod, a.to(w.device, w.dtype), b.to(w.device, w.dtype)))
        return found

    def _apply(self, lm):
        scale = self.scale
        hooks = Hooks([Intervention(f"lora:{name}", mod, "add_output",
                                    lambda x, out, a=a, b=b: scale * F.linear(F.linear(x.to(a.dtype), a), b))
                       for name, mod, a, b in self._targets(lm.model)]).attach()
        self._hook_ids = hooks.ids()
        return hooks.remove

    def _export_model(self, lm):
        """A merged copy of the base model: ``W + scale · B @ A`` on each target layer, no hooks."""
        base = copy.deepcopy(lm.model)
        for m in base.modules():  # drop the copied adapter hooks; the merge replaces them
            for hid in getattr(self, "_hook_ids", ()):
                m._forward_hooks.pop(hid, None)
        scale = self.scale
        with torch.no_grad():
            for _, mod, a, b in self._targets(base):
                delta = scale * (b.double() @ a.double())                       # (out, in)
                mod.weight += (delta.T if type(mod).__name__ == "Conv1D" else delta).to(mod.weight.dtype)
        return base

    def merged_model(self, lm):
        """The merged model as a new module (the base ``lm`` is untouched)."""
        self.check_base(lm)
        with self.applied(lm):
            return self._export_model(lm)

