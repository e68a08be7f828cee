"""Verdicts: what a before → after change means, decided by its interval and the metric's direction.

- ``higher`` / ``lower`` is better: **better** or **worse** when the paired 95 % interval of the delta excludes 0
  on that side, else **no detectable change**.
- an ``ideal`` value (50 for a stereotype score, 0 for a bias score or gap, 0.5 for a balanced positive rate): the
  distance to the ideal decides, not the raw delta — **better** / **worse** when the interval of the change in
  |value − ideal| excludes 0, **overshot** when the value moved detectably across the ideal (0.27 → 0.66 around 0.5
  is overshot, not "improved by 0.39"), else **no detectable change**.
"""
from __future__ import annotations

import math

VERDICTS = ("better", "worse", "overshot", "no detectable change", "undefined")


def _excludes_zero(ci) -> int:
    """+1 when the interval lies above 0, −1 below, 0 when it contains 0 (or is missing)."""
    if not ci or ci[0] is None or ci[1] is None:
        return 0
    return 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0


def verdict(block: dict) -> str:
    """The verdict of a summary metric block (``before``, ``after``, ``delta_ci95``, ``direction``, ``ideal`` and,
    for ideal-valued metrics, ``distance_to_ideal.delta_ci95``)."""
    b, a = block.get("before"), block.get("after")
    if b is None or a is None or (isinstance(b, float) and math.isnan(b)) or (isinstance(a, float) and math.isnan(a)):
        return "undefined"
    moved = _excludes_zero(block.get("delta_ci95"))
    direction = block.get("direction", "higher")
    if direction == "higher":
        return {1: "better", -1: "worse", 0: "no detectable change"}[moved]
    if direction == "lower":
        return {1: "worse", -1: "better", 0: "no detectable change"}[moved]
    ideal = block["ideal"]
    if moved and (b - ideal) * (a - ideal) < 0:
        return "overshot"
    closer = _excludes_zero((block.get("distance_to_ideal") or {}).get("delta_ci95"))
    return {1: "worse", -1: "better", 0: "no detectable change"}[closer]


def distance_fn(fn, ideal: float):
    """|fn(records) − ideal|, for the paired bootstrap of the distance to the ideal."""
    def dist(records):
        v = fn(records)
        return abs(v - ideal) if v is not None and not math.isnan(v) else math.nan
    return dist
