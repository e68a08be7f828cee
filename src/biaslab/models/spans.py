"""How far a model sees: its context length (the positions it was built for) and its attention span (the
shortest sliding window of any layer).

A sequence longer than the context is refused with one line: a model with learned absolute positions (GPT-2, OPT)
fails inside torch with an index error (on a GPU, a device-side assert that spoils the process), and a rotary model
scores positions it was never trained on, silently. lm-evaluation-harness truncates such inputs from the left; a
sign-off tool should not score a shortened item as if it were whole, so biaslab says which input is too long."""
from __future__ import annotations

from ..errors import BiaslabError


def attention_span(model) -> int | None:
    """The shortest attention span of any layer (a sliding window), or None when every layer sees the whole
    sequence."""
    cfg = getattr(model, "config", None)
    w = getattr(cfg, "sliding_window", None) if cfg is not None else None
    if not w or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and all(t == "full_attention" for t in types):
        return None
    return int(w)


def context_length(model) -> int | None:
    """``max_position_embeddings`` of the model's (text) config (GPT-2's ``n_positions`` maps onto it), or None
    where the config states none (T5's relative positions)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(lm, seqs: list[list[int]], *, extra: int = 0, what: str = "scoring") -> None:
    """One line naming the first sequence (its start, its length) that with ``extra`` tokens (those a generation
    adds) would not fit the model's context."""
    limit = context_length(lm.model)
    if limit is None:
        return
    for s in seqs:
        if len(s) + extra > limit:
            start = lm.tokenizer.decode(s[:16], skip_special_tokens=True).strip()
            need = f"{len(s)} tokens" + (f" + {extra} to generate" if extra else "")
            raise BiaslabError(f"{what}: an input of {need} does not fit the {limit}-token context of model "
                               f"{lm.spec!r} (max_position_embeddings in its config.json); it begins {start[:80]!r}. "
                               "Shorten the input, or use a model with a longer context")
