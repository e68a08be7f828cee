"""FAST's fairness stamp (docs/methods/fast.md): a small FFN on one layer's MLP input whose output is added to that
MLP's output at every position, and its patch (kind ``stamp``)."""
from __future__ import annotations

from torch import nn

from ...interventions import Hooks, Intervention
from ...errors import BiaslabError, UnknownNameError
from ...patches import Patch
from .config import STAMP_INITS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


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
        return self.w2(self.act(self.w1(x)))


def attach_stamp(lm, layer: int, stamp: StampFFN):
    """Register the stamp on the MLP of ``layer``: MLP(x) + stamp(x). Returns the hooks (``.remove()`` undoes)."""
    from ...tracing import check_layer, layer_modules

    check_layer(lm.model, layer)
    mlp = layer_modules(lm.model)[1][layer]

    return Hooks([Intervention(f"stamp:layer{layer}", mlp, "add_output", lambda x, out: stamp(x))]).attach()


class StampPatch(Patch):
    """FAST's result: a fairness stamp at one layer. Tensors ``stamp.w1.weight``, ``stamp.w1.bias``,
    ``stamp.w2.weight``, ``stamp.w2.bias``; params ``layer``, ``width``, ``activation``.

    Exportable when its activation is the model's own MLP activation (``silu`` for Llama-family models, whose
    config has ``mlp_bias``): a gated MLP ``down(act(gate x) · up x)`` with biases expresses the stamp exactly as
    ``width`` extra intermediate neurons — gate rows = w1 (bias b1), up rows = 0 (bias 1), down columns = w2, and
    b2 added to the decisive layer's down bias — zero-padded (all-zero neurons, zero biases) in every other layer,
    since the config has one intermediate size. The exported directory is a plain transformers model whose logits
    are verified against the stamped model like every export. Other activations (the FAST paper's ReLU default)
    cannot be folded into a SiLU-gated MLP, and say so."""

    kind = "stamp"

    @property
    def exportable(self) -> bool:
        return self.params.get("activation") == "silu"

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
        return st.to(device=lm.device, dtype=lm.dtype).eval().requires_grad_(False)

    def _apply(self, lm):
        stamp = self.build_stamp(lm)
        handle = attach_stamp(lm, int(self.params["layer"]), stamp)
        return handle.remove


    def export_refusal(self) -> str:
        return (f"its activation {self.params.get('activation')!r} cannot be folded into the model's SiLU-gated MLP; "
                "fit the stamp with --activation silu to ship it as a plain model")

    def _export_model(self, lm):
        """A new model of the same class with ``width`` more MLP neurons per layer (see the class docstring)."""
        import copy

        import torch

        cfg, model = lm.model.config, lm.model
        layer = int(self.params["layer"])
        mlps = _mlps(model)
        gated = all(m is not None and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")) for m in mlps)
        if not (gated and hasattr(cfg, "mlp_bias") and getattr(cfg, "hidden_act", None) == "silu"):
            raise BiaslabError(f"a stamp exports only onto a SiLU-gated MLP whose config has mlp_bias (Llama family); "
                               f"this model is {type(model).__name__} (hidden_act {getattr(cfg, 'hidden_act', '?')!r})")
        w1, b1, w2, b2 = (self.tensors[k].to(model.dtype) for k in self.KEYS)
        width = w1.shape[0]
        new_cfg = copy.deepcopy(cfg)
        new_cfg.intermediate_size = int(cfg.intermediate_size) + width
        new_cfg.mlp_bias = True
        new = type(model)(new_cfg).to(model.dtype).eval()
        state = model.state_dict()
        out = {}
        for i, mlp in enumerate(mlps):
            pre = _module_name(model, mlp)
            g, u, d = (state[f"{pre}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            bias = lambda n, size: state.get(f"{pre}.{n}.bias", torch.zeros(size, dtype=g.dtype))  # noqa: E731
            here = i == layer
            z_in, z_n = torch.zeros(width, g.shape[1], dtype=g.dtype), torch.zeros(width, dtype=g.dtype)
            out[f"{pre}.gate_proj.weight"] = torch.cat([g, w1.cpu() if here else z_in])
            out[f"{pre}.gate_proj.bias"] = torch.cat([bias("gate_proj", g.shape[0]), b1.cpu() if here else z_n])
            out[f"{pre}.up_proj.weight"] = torch.cat([u, z_in])
            out[f"{pre}.up_proj.bias"] = torch.cat([bias("up_proj", u.shape[0]), torch.ones_like(z_n) if here else z_n])
            out[f"{pre}.down_proj.weight"] = torch.cat([d, w2.cpu() if here else torch.zeros(d.shape[0], width, dtype=d.dtype)], 1)
            out[f"{pre}.down_proj.bias"] = bias("down_proj", d.shape[0]) + (b2.cpu() if here else 0)
        merged = {**{k: v for k, v in state.items()}, **out}
        missing, unexpected = new.load_state_dict(merged, strict=False)
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
