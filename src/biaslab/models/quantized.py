"""Pre-quantized checkpoints (a ``quantization_config`` in config.json: bitsandbytes, GPTQ, AWQ, …).

What biaslab does with them, as checked on CPU with bitsandbytes 0.50 (4-bit nf4; no GPU has run them):

- **audits** score them through transformers, as any other model, when the quantizer's library is installed
  (biaslab does not depend on any). The run's manifest records ``model.quantization``; the fingerprint is the
  checkpoint files', so the quantized model is another checkpoint than its unquantized source.
- **mitigations and probes** are refused before the weights load: they take gradients through the model or
  write weight patches, neither checked on quantized layers (with gradients on, bitsandbytes' 4-bit matmul
  fails with an in-place error inside the library; export cannot bake a patch into quantized weights). Fit on
  the unquantized checkpoint; then audit each model.
- a checkpoint whose quantizer's library is missing, or which it cannot read, is one line naming the method.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BiaslabError


def quantization_method(config) -> str | None:
    """The quantization method a transformers config (object or dict) declares, or None."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def checkpoint_quantization(path: Path) -> str | None:
    """The quantization declared in a model directory's config.json (None when absent or unreadable: the
    loader reports unreadable files itself)."""
    try:
        doc = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return quantization_method(doc) if isinstance(doc, dict) else None


def spec_quantization(spec) -> str | None:
    """The quantization of a model spec that names a local directory (embedded models, GGUF files and hub ids,
    which are resolved only when they load, say None here; the loaded model is checked again)."""
    if not isinstance(spec, (str, Path)):
        return None
    p = Path(spec).expanduser()
    return checkpoint_quantization(p) if p.is_dir() else None


def require_full_precision(what: str, *, spec=None, lm=None) -> None:
    """One clear line where ``what`` needs unquantized weights (gradients, weight patches)."""
    method = spec_quantization(spec) if spec is not None else None
    if method is None and lm is not None:
        method = quantization_method(lm.model.config)
    if method is None:
        return
    name = getattr(lm, "spec", None) or spec
    raise BiaslabError(f"{what} needs unquantized weights; {name} is a {method}-quantized checkpoint "
                       "(quantization_config in its config.json), and biaslab's gradients and weight patches are not supported "
                       "on quantized layers: fit on the unquantized checkpoint, then audit the quantized model with `biaslab audit`")


def load_failure(spec: str, method: str, e: Exception) -> BiaslabError:
    """A quantized checkpoint that transformers could not load: its library missing, or it rejected the files."""
    text = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
    missing = isinstance(e, ImportError) or "requires" in text or "install" in text.lower()
    why = (f"loading it needs the {method} library, which is not installed here (biaslab does not depend on it): "
           "install it to audit this model, or point --model at the unquantized checkpoint" if missing else
           f"the {method} library could not load its files: check they were saved by that library, or use the "
           "unquantized checkpoint")
    return BiaslabError(f"could not load model {spec!r}: it is a {method}-quantized checkpoint (quantization_config "
                        f"in its config.json); {why} ({type(e).__name__}: {text})")
