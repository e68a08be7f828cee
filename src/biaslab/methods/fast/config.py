"""FAST's settings (docs/methods/fast.md): the one source of defaults for the Python API, config files and the
CLI. None of these were published by the paper; the training defaults were chosen on the dev split
(experiments/fast/diagnose.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ...evaluation.config import option
from ...errors import BiaslabError, UnknownNameError

METHOD_VERSION = "fast-style.v1"
BIAS_TYPES = ("gender", "race", "religion")
TASKS = ("stereoset:gender", "stereoset:race", "stereoset:religion", "all")
# StereoSet domain -> CrowS-Pairs bias types of the same kind (cross-dataset PS)
CROWS_TYPES = {"gender": ("gender",), "race": ("race-color", "nationality"), "religion": ("religion",)}
ACTIVATION_NAMES = ("relu", "gelu", "silu", "tanh", "gelu_tanh")
# initialisation of the stamp's first layer; the second layer always starts at zero, which is what makes the
# freshly stamped model identical to the original (so the choice changes training, never the starting point)
STAMP_INITS = ("pytorch", "xavier", "normal")   # nn.Linear's own (Kaiming-uniform) | Xavier-uniform, bias 0 |
                                                # N(0, 0.02²), bias 0 (GPT-style)
FAIRNESS_LOSSES = ("gap", "gap+js")  # L_e variants (FastConfig.fairness)



@dataclass
class FastConfig:
    """Every FAST setting with its default."""
    layer: int | None = option(None, "stamp layer (default: the decisive layer from causal tracing)")
    width: int = option(64, "hidden width of the stamp FFN")
    activation: str = option("relu", "stamp activation: relu | gelu | silu | tanh | gelu_tanh (GELU's "
                                   "tanh form); an exportable stamp uses the model's own MLP activation")
    init: str = option("pytorch", "first-layer initialisation: pytorch (nn.Linear's) | xavier | normal (std 0.02); "
                                "the second layer starts at 0, so the stamped model starts identical")
    alpha: float = option(1.0, "weight of the same-subject KL term L_s1")
    beta: float = option(1.0, "weight of the unrelated-text KL term L_s2")
    steps: int = option(60, "training steps (chosen on the gender dev split)")
    lr: float = option(3e-3, "stamp learning rate (Adam)")
    batch_pairs: int = option(8, "biased pairs per step")
    batch_subject: int = option(2, "same-subject prompts per step (L_s1)")
    batch_text: int = option(1, "WikiText windows per step (L_s2)")
    text_tokens: int = option(128, "length (tokens) of the WikiText windows of L_s2")
    n_subject_prompts: int = option(48, "same-subject prompts built for L_s1")
    n_text: int = option(32, "WikiText windows drawn for L_s2")
    fairness: str = option("gap", "L_e: gap (the paper: squared log-prob gap of o) | gap+js (+ JS divergence of the "
                                "two prompts' next-token distributions; a deviation)")
    js_weight: float = option(10.0, "weight of the JS part under fairness gap+js")
    ftl_lr: float = option(1e-4, "learning rate of one FT-L run (train(mode='ftl'))")
    ftl_lrs: tuple[float, ...] = option((1e-4, 1e-3), "FT-L learning rates tried (comma-separated); the dev match "
                                                   "to FAST picks one")
    ftl_eval_every: int = option(10, "FT-L checkpoints scored on dev every this many steps")
    seed: int = option(0, "seed of the split, tracing, training and evaluation samples (the run's --seed)")
    n_trace: int = option(24, "training pairs used for causal tracing")
    n_noise: int = option(3, "noise samples per pair in causal tracing")
    baselines: bool = option(True, "also train FT-L and the α=β=0 stamp as controls")
    retention_limit: int | None = option(60, "retention items (WikiText windows + facts); 0 = skip")
    micro_batch_pairs: int | None = option(None, "under torchrun: cut every training step into parts of this many "
                                                 "pairs / prompts / windows, shared across ranks and added in part "
                                                 "order (the same stamp as one process with this setting; default: "
                                                 "every rank trains each step whole)")

    def __post_init__(self):
        self.ftl_lrs = tuple(float(x) for x in self.ftl_lrs)
        if self.init not in STAMP_INITS:
            raise UnknownNameError("stamp initialisation", self.init, STAMP_INITS)
        if self.activation not in ACTIVATION_NAMES:
            raise UnknownNameError("stamp activation", self.activation, ACTIVATION_NAMES)
        if self.fairness not in FAIRNESS_LOSSES:
            raise UnknownNameError("FAST fairness loss", self.fairness, FAIRNESS_LOSSES)
        checks = [(self.js_weight >= 0, f"--js-weight must be ≥ 0, got {self.js_weight}"),
                  (self.steps > 0, f"--steps must be positive, got {self.steps}"),
                  (self.width > 0, f"--width must be positive, got {self.width}"),
                  (self.text_tokens >= 2, f"--text-tokens must be at least 2, got {self.text_tokens}"),
                  (bool(self.ftl_lrs) and all(x > 0 for x in self.ftl_lrs),
                   f"--ftl-lrs needs one or more positive learning rates, got {list(self.ftl_lrs)}"),
                  (self.n_trace >= 1 and self.n_noise >= 1, "--n-trace and --n-noise must be at least 1"),
                  (self.retention_limit is None or self.retention_limit >= 0,
                   f"--retention-limit must be ≥ 0, got {self.retention_limit}"),
                  (self.micro_batch_pairs is None or self.micro_batch_pairs >= 1,
                   f"--micro-batch-pairs must be ≥ 1 (or left out), got {self.micro_batch_pairs}")]
        for ok, msg in checks:
            if not ok:
                raise BiaslabError(msg)

    def to_json(self) -> dict:
        return asdict(self)


def parse_task(task: str) -> tuple[str, ...]:
    """``stereoset:gender,stereoset:race`` / ``all`` -> bias types."""
    out = []
    for t in [x.strip() for x in (task or "").split(",") if x.strip()]:
        if t == "all":
            return BIAS_TYPES
        if t not in TASKS:
            raise UnknownNameError("fast task", t, TASKS)
        out.append(t.split(":", 1)[1])
    if not out:
        raise BiaslabError(f"--task is empty; choose from {', '.join(TASKS)}")
    return tuple(dict.fromkeys(out))
