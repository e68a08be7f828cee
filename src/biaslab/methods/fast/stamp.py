"""FAST's fairness stamp (docs/methods/fast.md): a small FFN on one layer's MLP input whose output is added to that
MLP's output at every position, and its patch (kind ``stamp``)."""
from __future__ import annotations

from torch import nn

from ...interventions import Hooks, Intervention
from ...errors import BiaslabError, UnknownNameError
from ...patches import Patch
from .config import STAMP_INITS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
# a model's MLP activation (its config's name) → the stamp activation that folds into that MLP exactly
MODEL_ACTIVATION = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh"}
# MLPs a stamp folds into: (in-projection, out-projection, config field of the intermediate size)
_PLAIN_MLPS = {"gpt2": ("c_fc", "c_proj", "n_inner"), "gpt_neox": ("dense_h_to_4h", "dense_4h_to_h", "intermediate_size")}


class StampFFN(nn.Module):
    """d → width → d, ``act`` in between; the first layer initialised by ``init`` (:data:`STAMP_INITS`), the
    second layer (weight and bias) at zero, so the stamp's output is 0 until it is trained."""

    def __init__(self, d: int, width: int, activation: str = "relu", init: str = "pytorch"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UnknownNameError("stamp activation", activation, ACTIVATIONS)
        if init not in STAMP_INITS:
            raise UnknownNameError("stamp initialisation", init, STAMP_INITS)
        if width <= 0:
            raise BiaslabError(f"--stamp-width must be positive, got {width}")
        self.w1 = nn.Linear(d, width)
        if init == "xavier":
            nn.init.xavier_uniform_(self.w1.weight)
            nn.init.zeros_(self.w1.bias)
        elif init == "normal":
            nn.init.normal_(self.w1.weight, std=0.02)
            nn.init.zeros_(self.w1.bias)
        self.act = ACTIVATIONS[activation]()
        self.w2 = nn.Linear(width, d)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x):
        """In the stamp's own dtype (float32 while it is trained on a bf16/fp16 model); the hook casts the sum back
        to the layer's dtype."""
        return self.w2(self.act(self.w1(x.to(self.w1.weight.dtype))))


def stamp_device(lm, layer: int):
    """Where a stamp at ``layer`` runs: that layer's MLP's device (under a device map, not necessarily the
    model's first device)."""
    from ...tracing import check_layer, layer_modules

    check_layer(lm.model, layer)
    return next(layer_modules(lm.model)[1][layer].parameters()).device


def attach_stamp(lm, layer: int, stamp: StampFFN):
    """Register the stamp on the MLP of ``layer``: MLP(x) + stamp(x). Returns the hooks (``.remove()`` undoes)."""
    from ...tracing import check_layer, layer_modules

    check_layer(lm.model, layer)
    mlp = layer_modules(lm.model)[1][layer]

    return Hooks([Intervention(f"stamp:layer{layer}", mlp, "add_output", lambda x, out: stamp(x))]).attach()


class StampPatch(Patch):
    """FAST's result: a fairness stamp at one layer. Tensors ``stamp.w1.weight``, ``stamp.w1.bias``,
    ``stamp.w2.weight``, ``stamp.w2.bias``; params ``layer``, ``width``, ``activation``.

    Exportable when its activation is the model's own MLP activation, as ``width`` extra intermediate neurons,
    zero-padded (all-zero neurons, zero biases) in every other layer since the config has one intermediate size:
    - Llama family with ``mlp_bias`` in its config (``silu``): a gated MLP ``down(act(gate x) · up x)`` takes
      gate rows = w1 (bias b1), up rows = 0 (bias 1), down columns = w2, and b2 added to the down bias;
    - GPT-2 (``gelu_tanh``, its ``gelu_new``) and GPT-NeoX / Pythia (``gelu``): a plain MLP ``out(act(in x))``
      with biases takes in rows = w1 (bias b1), out columns = w2, b2 added to the out bias.
    The exported directory is a plain transformers model whose logits are verified against the stamped model like
    every export. Other pairs (the FAST paper's ReLU default; bias-free MLPs such as Qwen's, Mistral's, Gemma's,
    which cannot hold b1) say so in one line."""

    kind = "stamp"

    @property
    def exportable(self) -> bool:
        """Whether some supported family's MLP can hold this stamp (the model itself is checked at export)."""
        return self.params.get("activation") in set(MODEL_ACTIVATION.values())

    @classmethod
    def from_stamp(cls, lm, stamp: StampFFN, *, layer: int, activation: str, params: dict | None = None,
                   provenance: dict | None = None) -> "StampPatch":
        tensors = {f"stamp.{k}": v.detach().cpu().float().clone() for k, v in stamp.state_dict().items()}
        p = {"layer": int(layer), "width": int(stamp.w1.out_features), "activation": activation, **(params or {})}
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec, params=p, provenance=provenance, tensors=tensors)

    KEYS = ("stamp.w1.weight", "stamp.w1.bias", "stamp.w2.weight", "stamp.w2.bias")

    def validate(self) -> "StampPatch":
        for k in ("layer", "width", "activation"):
            if k not in self.params:
                raise BiaslabError(f"stamp patch lacks the parameter {k!r}")
        if sorted(self.tensors) != sorted(self.KEYS):
            raise BiaslabError(f"stamp patch tensors must be {', '.join(self.KEYS)}; got {', '.join(sorted(self.tensors))}")
        w1, b1, w2, b2 = (self.tensors[k] for k in self.KEYS)
        width = int(self.params["width"])
        if not all(t.is_floating_point() for t in (w1, b1, w2, b2)) or w1.dim() != 2 or w1.shape[0] != width \
                or tuple(b1.shape) != (width,) or tuple(w2.shape) != (w1.shape[1], width) or tuple(b2.shape) != (w1.shape[1],):
            raise BiaslabError(f"stamp patch shapes do not form a d → {width} → d FFN: w1 {tuple(w1.shape)}, b1 "
                               f"{tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
        if self.params["activation"] not in ACTIVATIONS:
            raise UnknownNameError("stamp activation", self.params["activation"], ACTIVATIONS)
        return self

    def build_stamp(self, lm) -> StampFFN:
        self.validate()
        d = self.tensors["stamp.w1.weight"].shape[1] if "stamp.w1.weight" in self.tensors else None
        hidden = lm.model.get_input_embeddings().weight.shape[1]
        if d != hidden:
            raise BiaslabError(f"stamp input width {d} does not match the model's hidden size {hidden}")
        st = StampFFN(hidden, int(self.params["width"]), self.params["activation"])
        st.load_state_dict({k[len("stamp."):]: v for k, v in self.tensors.items() if k.startswith("stamp.")})
        return st.to(device=stamp_device(lm, int(self.params["layer"])), dtype=lm.dtype).eval().requires_grad_(False)

    def _apply(self, lm):
        stamp = self.build_stamp(lm)
        handle = attach_stamp(lm, int(self.params["layer"]), stamp)
        return handle.remove


    def export_refusal(self) -> str:
        return (f"its activation {self.params.get('activation')!r} is no model's MLP activation, so it cannot be folded "
                "into the MLP; fit the stamp with the model's own (--activation silu for Llama-family models, "
                "gelu_tanh for GPT-2, gelu for GPT-NeoX) to ship it as a plain model")

    def _export_model(self, lm):
        """A new model of the same class with ``width`` more MLP neurons per layer (see the class docstring)."""
        from ...models.sites import model_family

        cfg, model = lm.model.config, lm.model
        fam = model_family(model)
        act_name = (getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
                    or getattr(cfg, "activation_function", None))
        want = MODEL_ACTIVATION.get(str(act_name))
        mine = self.params.get("activation")
        if want is not None and mine != want:
            raise BiaslabError(f"this stamp's activation {mine!r} is not the MLP activation of {type(model).__name__} "
                               f"({act_name!r}, i.e. stamp activation {want!r}); refit with --activation {want}")
        mlps = _mlps(model)
        if fam in _PLAIN_MLPS and want is not None:
            return self._widen(lm, mlps, *_PLAIN_MLPS[fam], gated=False)
        gated = all(m is not None and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")) for m in mlps)
        if not (gated and hasattr(cfg, "mlp_bias") and want == "silu"):
            raise BiaslabError(f"a stamp exports onto a SiLU-gated MLP whose config has mlp_bias (Llama family), or the "
                               f"biased MLPs of GPT-2 / GPT-NeoX; {type(model).__name__} (hidden_act {act_name!r}) has "
                               "neither, so its MLP cannot hold the stamp's bias")
        return self._widen(lm, mlps, "gate_proj", "down_proj", "intermediate_size", gated=True)

    def _widen(self, lm, mlps, inp: str, out_name: str, size_field: str, *, gated: bool):
        import copy

        import torch

        cfg, model = lm.model.config, lm.model
        layer = int(self.params["layer"])
        w1, b1, w2, b2 = (self.tensors[k].to(model.dtype) for k in self.KEYS)
        width = w1.shape[0]
        new_cfg = copy.deepcopy(cfg)
        base = getattr(cfg, size_field, None) or 4 * cfg.hidden_size   # GPT-2: n_inner None means 4·d
        setattr(new_cfg, size_field, int(base) + width)
        if gated:
            new_cfg.mlp_bias = True
        new = type(model)(new_cfg).to(model.dtype).eval()
        state = model.state_dict()
        out = {}
        for i, mlp in enumerate(mlps):
            pre = _module_name(model, mlp)
            here = i == layer
            conv = type(getattr(mlp, inp)).__name__ == "Conv1D"   # GPT-2 stores (in, out)
            w_in, w_out = state[f"{pre}.{inp}.weight"], state[f"{pre}.{out_name}.weight"]
            dt = w_in.dtype
            bias = lambda n, size: state.get(f"{pre}.{n}.bias", torch.zeros(size, dtype=dt))  # noqa: E731
            a = (w1.cpu() if here else torch.zeros(width, w1.shape[1], dtype=dt))        # (width, d)
            c = (w2.cpu() if here else torch.zeros(w2.shape[0], width, dtype=dt))        # (d, width)
            z = torch.zeros(width, dtype=dt)
            n_in = w_in.shape[1] if conv else w_in.shape[0]
            out[f"{pre}.{inp}.weight"] = torch.cat([w_in, a.T], 1) if conv else torch.cat([w_in, a])
            out[f"{pre}.{inp}.bias"] = torch.cat([bias(inp, n_in), b1.cpu() if here else z])
            out[f"{pre}.{out_name}.weight"] = torch.cat([w_out, c.T]) if conv else torch.cat([w_out, c], 1)
            out[f"{pre}.{out_name}.bias"] = bias(out_name, w2.shape[0]) + (b2.cpu() if here else 0)
            if gated:   # the up projection: 0 rows, bias 1 on the decisive layer's new neurons
                u = state[f"{pre}.up_proj.weight"]
                out[f"{pre}.up_proj.weight"] = torch.cat([u, torch.zeros(width, u.shape[1], dtype=dt)])
                out[f"{pre}.up_proj.bias"] = torch.cat([bias("up_proj", u.shape[0]), torch.ones_like(z) if here else z])
        missing, unexpected = new.load_state_dict({**state, **out}, strict=False)
        if [k for k in missing if not k.endswith("bias")] or unexpected:
            raise BiaslabError(f"stamp export: the widened model's parameters do not match ({missing[:3]}, {unexpected[:3]})")
        if getattr(cfg, "tie_word_embeddings", False):
            new.tie_weights()
        return new.to(lm.device)


def _mlps(model):
    from ...tracing import layer_modules

    return layer_modules(model)[1]


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise BiaslabError("stamp export: an MLP module is not part of the model")
