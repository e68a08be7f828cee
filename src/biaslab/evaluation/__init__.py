"""The experiment runner shared by every method: :func:`run_mitigation`, the method interface
(:class:`Method`), what a method hands the runner (:mod:`.plan`) and the one summary schema (:mod:`.schema`)."""
from __future__ import annotations

from .method import FitCache, Method
from .plan import Control, EvalSet, FitResult, MetricSpec, RetentionPlan, TaskData
from .schema import SCHEMA_ID, SchemaError, validate_summary


def run_mitigation(*args, **kwargs):
    from .runner import run_mitigation as _run

    return _run(*args, **kwargs)


__all__ = ["Control", "EvalSet", "FitCache", "FitResult", "Method", "MetricSpec", "RetentionPlan", "SCHEMA_ID",
           "SchemaError", "TaskData", "run_mitigation", "validate_summary"]
