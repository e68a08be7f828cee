"""SR_LLM's settings (Raza et al. 2024, arXiv 2404.01399; docs/methods/srllm.md): the one source of defaults for
the Python API, config files and the CLI, and the fixed prompt of the rewriting protocol."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ...evaluation.config import option
from ...errors import BiaslabError

SYSTEM_PROMPT = ("You are a text-debiasing assistant. You rewrite text so that it is free of bias "
                 "and keeps all of its information.")
INSTRUCTION = "Rewrite the following text so that it is free of bias while keeping its information: {text}"
PROTOCOL_ID = "srllm.rewrite.v1"   # prompt (system + instruction, chat template) + greedy decoding



@dataclass
class SRLLMConfig:
    """Every SR_LLM setting with its default (paper values in docs/methods/srllm.md)."""
    r: int = option(16, "LoRA rank")
    alpha: float = option(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.05, "LoRA dropout")
    target_modules: tuple[str, ...] = option((), "Linear module names to adapt (comma-separated; default: the model "
                                               "family's attention and MLP projections from the sites table)")
    lr: float = option(5e-4, "learning rate (constant after warmup)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup: float = option(0.03, "warmup share of the steps")
    epochs: float = option(1.0, "passes over the training pairs (early stopping may end sooner)")
    batch_size: int = option(8, "training batch size")
    micro_batch_size: int | None = option(None, "examples per gradient part: each batch is cut into parts of this "
                                                "many, shared across torch.distributed ranks and summed in part "
                                                "order, so any number of processes trains the same adapter "
                                                "(default: the whole batch in one part, trained by every rank)")
    max_length: int = option(128, "longest training example in tokens (longer are skipped)")
    eval_every: int = option(25, "optimizer steps between validation-loss checks")
    patience: int = option(3, "validation checks without improvement before stopping")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    seed: int = option(0, "seed of the pair samples, the adapter's init and the batch order (the run's --seed)")
    train_limit: int | None = option(640, "training pairs (seeded, balanced over sources)")
    val_limit: int | None = option(96, "validation pairs for early stopping")
    split_seed: int = option(0, "seed of the train / validation / test split")
    retention: bool = option(True, "audit stereoset, crows and retention without / with the adapter")
    retention_limit: int | None = option(200, "items per retention benchmark")
    rewrite_chunk: int | None = option(None, "held-out pairs per evaluation chunk, the unit of resume and of sharing "
                                             "across ranks (default: all in one chunk; rewrites are batched inside a "
                                             "chunk, so another size may change a rewrite by float rounding)")

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        checks = [(self.r >= 1, f"LoRA rank r must be >= 1, got {self.r}"),
                  (self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}"),
                  (0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}"),
                  (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                  (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
                  (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                  (self.max_length >= 16, f"max length must be >= 16 tokens, got {self.max_length}"),
                  (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
                  (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
                  (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}")]
        checks += [(self.train_limit is None or self.train_limit > 0, f"--train-limit must be positive, got {self.train_limit}"),
                   (self.val_limit is None or self.val_limit > 0, f"--val-limit must be positive, got {self.val_limit}"),
                   (self.retention_limit is None or self.retention_limit > 0,
                    f"--retention-limit must be positive, got {self.retention_limit}"),
                   (self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
                    f"--micro-batch-size must be between 1 and the batch size ({self.batch_size}), got "
                    f"{self.micro_batch_size}"),
                   (self.rewrite_chunk is None or self.rewrite_chunk > 0,
                    f"--rewrite-chunk must be positive, got {self.rewrite_chunk}")]
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

