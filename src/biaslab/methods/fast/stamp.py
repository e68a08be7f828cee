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

    Not exportable: the stamp is an extra non-linear branch, which a plain Hugging Face model of the same
    architecture cannot express (folding it into the MLP weights is impossible in general)."""

    kind = "stamp"
    exportable = False

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

