"""Methods, one package each, found through a lazy registry: ``METHODS.get("crispr")`` is the method class
(:class:`biaslab.evaluation.Method`). Register a new one with ``METHODS.register(name, "module:Class")``; the
contract tests (tests/test_contract.py) then run over it."""
from __future__ import annotations

from ..registry import LazyRegistry

METHODS = LazyRegistry("method", {
    "crispr": "biaslab.methods.crispr.method:Crispr",
    "fast": "biaslab.methods.fast.method:Fast",
    "srllm": "biaslab.methods.srllm.method:SRLLM",
    "cc": "biaslab.methods.calibration.method:ContextualCalibration",
    "dc": "biaslab.methods.calibration.method:DomainContextCalibration",
})

__all__ = ["METHODS"]
