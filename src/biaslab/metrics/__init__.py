"""Metrics: pure functions of per-item records (``f(records) -> float``), one module per benchmark.

Each module documents its source paper, its scale (accuracies as fractions 0–1, bias/stereotype scores on the
paper's 0–100 or ×100 scale) and what an undefined value (empty subset, zero denominator) returns: NaN, reported
as null in results.json.
"""
