"""Neuron sites: where the neurons live for each architecture family, in one table.

Two site kinds (docs/methods/crispr.md):
- ``ffn``: FFN intermediate neurons — the *input* of each layer's down projection. Neuron i's activation is
  that input's i-th unit; pruning zeroes column i of the down projection (its whole contribution).
- ``linear``: every output unit of every linear layer (attention q/k/v/o and FFN), the released CRISPR code's
  reading. Unit j's activation is the layer's j-th output; pruning zeroes weight row j and bias entry j.

Mixture-of-experts layers (family ``moe``: Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, DeepSeek-V2/V3) have one ``ffn``
site for the fused experts module, whose unit e·I + i is expert e's neuron i (:mod:`.experts`), plus one for a
shared expert's down projection; ``linear`` is not defined for them (their expert weights are not linear modules)
and is refused.

Attribution and pruning go through :func:`find_sites` only, so no architecture is hard-coded elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BiaslabError, UnknownNameError

SITE_KINDS = ("ffn", "linear")

# family -> layer container paths, FFN down-projection path inside a layer, linear sub-module names in a layer, and
# the LoRA targets (module names, as peft matches them) — the only place these names are written
SITE_TABLE: dict[str, dict] = {
    "llama": {"layers": ["model.layers"], "down": "mlp.down_proj",
              "linear": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              "lora": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    "gpt2": {"layers": ["transformer.h"], "down": "mlp.c_proj",
             "linear": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
             "lora": ("c_attn", "c_proj", "c_fc")},
    "gpt_neox": {"layers": ["gpt_neox.layers"], "down": "mlp.dense_4h_to_h",
                 "linear": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
                 "lora": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")},
    "phi3": {"layers": ["model.layers"], "down": "mlp.down_proj",
             "linear": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
             "lora": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")},
    "opt": {"layers": ["model.decoder.layers"], "down": "fc2",
            "linear": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
            "lora": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")},
    "t5": {"layers": ["encoder.block", "decoder.block"], "down": None,  # resolved per stack below
           "linear": None, "lora": ("q", "k", "v", "o", "wi", "wo")},
    "moe": {"layers": ["model.layers"], "down": "mlp.experts", "linear": None,   # the fused experts (.experts)
            "lora": ("q_proj", "k_proj", "v_proj", "o_proj",   # and DeepSeek's latent attention (MLA):
                     "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")},
}
FAMILY_OF_MODEL_TYPE = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe", "olmoe": "moe", "phimoe": "moe", "deepseek_v2": "moe",
    "deepseek_v3": "moe", "gemma2": "llama", "gemma3_text": "llama", "smollm3": "llama", "olmo": "llama",
    "olmo2": "llama",
    "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gpt_neox", "opt": "opt", "t5": "t5", "mt5": "t5",
}

# mixture-of-experts types without a site table, and why
MOE_WITHOUT_SITES = {
    "gpt_oss": "its experts have biases and a clamped gate",
    "granitemoe": "its experts sit in block_sparse_moe, not mlp.experts",
}


@dataclass(frozen=True)
class Site:
    """One group of neurons: ``n_units`` activations at ``module`` (input if kind == 'ffn', else output)."""
    name: str          # stable id used in patches, e.g. "model.layers.3.mlp.down_proj"
    layer: int         # index in a global layer order (encoder then decoder for T5)
    kind: str          # "ffn" | "linear"
    module: nn.Module
    n_units: int
    expert_width: int = 0   # > 0: a fused experts module (MoE) with this many neurons per expert

    @property
    def edit_kind(self) -> str:
        """The intervention kind (:mod:`biaslab.interventions`) that edits this site's activations."""
        return "edit_experts" if self.expert_width else "edit_input" if self.kind == "ffn" else "replace_output"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def is_conv1d(self) -> bool:  # GPT-2's Conv1D stores weight as (in, out)
        return type(self.module).__name__ == "Conv1D"

    def unit_weights(self, units: torch.Tensor) -> list[tuple[torch.Tensor, tuple]]:
        """The (parameter, index) pairs that pruning these units zeroes."""
        if self.expert_width:    # expert e's neuron i: column i of down_proj[e]
            return [(self.module.down_proj, (units // self.expert_width, slice(None), units % self.expert_width))]
        w = self.module.weight
        b = getattr(self.module, "bias", None)
        if self.kind == "ffn":  # columns of the down projection (rows of a Conv1D weight)
            return [(w, (units, slice(None)) if self.is_conv1d else (slice(None), units))]
        out = [(w, (slice(None), units) if self.is_conv1d else (units, slice(None)))]
        if b is not None:
            out.append((b, (units,)))
        return out


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def model_family(model: nn.Module) -> str:
    mt = getattr(model.config, "model_type", "")
    if FAMILY_OF_MODEL_TYPE.get(mt):
        return FAMILY_OF_MODEL_TYPE[mt]
    if mt in MOE_WITHOUT_SITES:
        raise BiaslabError(f"model type {mt!r} (mixture of experts) has no neuron-site table: "
                           f"{MOE_WITHOUT_SITES[mt]}; the MoE types with one are mixtral, qwen2_moe, qwen3_moe, "
                           "olmoe, phimoe and deepseek_v2/v3 (audits run on any model)")
    raise BiaslabError(f"no neuron-site table for model type {mt!r}; supported: {', '.join(sorted(k for k, v in FAMILY_OF_MODEL_TYPE.items() if v))}")


def _out_features(m: nn.Module) -> int:
    if hasattr(m, "out_features"):
        return m.out_features
    return m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0]


def _in_features(m: nn.Module) -> int:
    if hasattr(m, "in_features"):
        return m.in_features
    return m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1]


def _moe_layer_sites(layer: nn.Module, prefix: str, layer_idx: int) -> list[Site]:
    """A MoE model's layer: its fused experts (and a shared expert's down projection, as Qwen2-MoE has), or the
    down projection of a dense layer among the sparse ones (Qwen-MoE's ``mlp_only_layers``)."""
    from .experts import fused_experts

    mlp = getattr(layer, "mlp", None)
    if not hasattr(mlp, "experts"):
        if not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            raise BiaslabError(f"{prefix} ({type(layer).__name__}) has neither mlp.experts nor mlp.down_proj: the "
                               "mixture-of-experts site table does not know this layout")
        return [Site(f"{prefix}.mlp.down_proj", layer_idx, "ffn", mlp.down_proj, _in_features(mlp.down_proj))]
    n_exp, width = fused_experts(mlp.experts, f"{prefix}.mlp.experts")
    out = [Site(f"{prefix}.mlp.experts", layer_idx, "ffn", mlp.experts, n_exp * width, width)]
    for attr in ("shared_expert", "shared_experts"):   # Qwen2-MoE's, DeepSeek's
        shared = getattr(mlp, attr, None)
        if shared is not None:
            out.append(Site(f"{prefix}.mlp.{attr}.down_proj", layer_idx, "ffn", shared.down_proj,
                            _in_features(shared.down_proj)))
    return out


def find_sites(model: nn.Module, kind: str = "ffn") -> list[Site]:
    """All neuron sites of ``kind`` in layer order."""
    if kind not in SITE_KINDS:
        raise UnknownNameError("site kind", kind, SITE_KINDS)
    fam = model_family(model)
    if fam == "moe" and kind == "linear":
        raise BiaslabError(f"linear sites (every linear layer's output units) are not defined for "
                           f"{type(model).__name__}: its experts' weights are fused tensors, not linear layers; use "
                           "--sites ffn (every expert's FFN neurons)")
    sites: list[Site] = []
    layer_idx = 0
    for container in SITE_TABLE[fam]["layers"]:
        try:
            layers = _get(model, container)
        except AttributeError:
            continue
        for li, layer in enumerate(layers):
            prefix = f"{container}.{li}"
            if fam == "t5":
                ffn_names = [f"layer.{j}.DenseReluDense.wo" for j, sub in enumerate(layer.layer) if hasattr(sub, "DenseReluDense")]
                lin_names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            else:
                ffn_names = [SITE_TABLE[fam]["down"]]
                lin_names = SITE_TABLE[fam]["linear"]
            if kind == "ffn" and fam == "moe":
                sites += _moe_layer_sites(layer, prefix, layer_idx)
            elif kind == "ffn":
                for n in ffn_names:
                    m = _get(layer, n)
                    sites.append(Site(f"{prefix}.{n}", layer_idx, "ffn", m, _in_features(m)))
            else:
                for n in lin_names:
                    m = _get(layer, n)
                    sites.append(Site(f"{prefix}.{n}", layer_idx, "linear", m, _out_features(m)))
            layer_idx += 1
    if not sites:
        raise BiaslabError(f"found no {kind} sites in {type(model).__name__}")
    return sites


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The model family's LoRA target module names (attention and MLP projections; on a MoE model the attention
    projections it has — its experts are fused tensors, not linear layers)."""
    fam = model_family(model)
    names = SITE_TABLE[fam]["lora"]
    if fam == "moe":
        have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        names = [n for n in names if n in have]
    return tuple(names)


def site_by_name(model: nn.Module, kind: str) -> dict[str, Site]:
    return {s.name: s for s in find_sites(model, kind)}
