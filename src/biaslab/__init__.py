"""biaslab: find social bias in language models and remove it without breaking what the model knows.

Python API (the CLI is a thin layer over it)::

    import biaslab
    lm = biaslab.load_model("smollm2-135m-instruct")
    res = biaslab.audit(model=lm, benchmarks=["bbq", "crows"], limit=100)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    from .models import load_model as _load

    return _load(*args, **kwargs)


def audit(model="smollm2-135m-instruct", benchmarks="all", **kwargs):
    from .auditing import audit as _audit

    return _audit(model, benchmarks, **kwargs)


def load_patch(path):
    from .patches import load_patch as _lp

    return _lp(path)


__all__ = ["audit", "load_model", "load_patch", "__version__"]
