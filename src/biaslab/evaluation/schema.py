"""The one ``summary.json`` schema every mitigation writes (``biaslab.summary.v1``), and its validator.

Top level::

    schema, method, method_version, task, model{spec, fingerprint}, patch{kind, file, identity, ...},
    evaluation{seed, limit, n_boot, ci, sets{name: {n_items, protocol, ids_hash, ids_file}}},
    metrics{name: METRIC}, controls{name: {description, members, metrics{name: CONTROL_METRIC}}},
    retention (null or {limit, seed, benchmarks{name: {protocol, n_items, metrics{name: METRIC}}}}),
    details{...method-specific}, deviations[str], notes[str], config{...}, timings_s{...},
    policy (null or {policy, status, rules[{rule, key, op, threshold, status, ...}]})

METRIC: before, after, delta, delta_ci95 ([lo, hi] or null), p, n_items, scale, direction (higher | lower |
ideal), ideal (number or null), description, verdict (better | worse | overshot | no detectable change |
undefined; ideal-valued metrics also carry distance_to_ideal). A control's metric adds method_minus_control,
method_minus_control_ci95, method_minus_control_p and per_member. Numbers that are undefined are null.
"""
from __future__ import annotations

from ..errors import BiaslabError
from .plan import DIRECTIONS

SCHEMA_ID = "biaslab.summary.v1"
NUM = (int, float, type(None))

TOP = {"schema": str, "method": str, "method_version": str, "task": str, "model": dict, "patch": dict,
       "evaluation": dict, "metrics": dict, "controls": dict, "retention": (dict, type(None)), "details": dict,
       "deviations": list, "notes": list, "config": dict, "timings_s": dict, "policy": (dict, type(None))}
METRIC = {"before": NUM, "after": NUM, "delta": NUM, "delta_ci95": (list, type(None)), "p": NUM, "n_items": int,
          "scale": str, "direction": str, "ideal": NUM, "description": str, "verdict": str}
CONTROL_EXTRA = {"method_minus_control": NUM, "method_minus_control_ci95": (list, type(None)),
                 "method_minus_control_p": NUM, "per_member": list}
SET = {"n_items": int, "protocol": str, "ids_hash": str, "ids_file": str}


class SchemaError(BiaslabError):
    """A summary that does not follow :data:`SCHEMA_ID` (names the path of the first bad field)."""


def _check(obj, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, types in spec.items():
        if key not in obj:
            raise SchemaError(f"{where}: missing field {key!r}")
        v = obj[key]
        if isinstance(v, bool) and types in (NUM, int):
            raise SchemaError(f"{where}.{key}: expected a number, got a boolean")
        if not isinstance(v, types):
            raise SchemaError(f"{where}.{key}: expected {_names(types)}, got {type(v).__name__}")


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_metric(m, where: str, extra: dict | None = None) -> None:
    _check(m, METRIC | (extra or {}), where)
    if m["direction"] not in DIRECTIONS:
        raise SchemaError(f"{where}.direction: expected one of {', '.join(DIRECTIONS)}, got {m['direction']!r}")
    from ..signoff.verdicts import VERDICTS

    if m["verdict"] not in VERDICTS:
        raise SchemaError(f"{where}.verdict: expected one of {', '.join(VERDICTS)}, got {m['verdict']!r}")
    if m["direction"] == "ideal" and m["ideal"] is None:
        raise SchemaError(f"{where}.ideal: a metric with direction 'ideal' needs its ideal value")
    for k in ("delta_ci95", "method_minus_control_ci95"):
        ci = m.get(k)
        if ci is not None and (len(ci) != 2 or not all(isinstance(x, NUM) for x in ci)):
            raise SchemaError(f"{where}.{k}: expected [lo, hi], got {ci!r}")


def validate_summary(s: dict) -> dict:
    """``s`` unchanged if it follows the schema, else a :class:`SchemaError` naming the first bad field."""
    _check(s, TOP, "summary")
    if s["schema"] != SCHEMA_ID:
        raise SchemaError(f"summary.schema: expected {SCHEMA_ID!r}, got {s['schema']!r}")
    _check(s["model"], {"spec": str, "fingerprint": str}, "summary.model")
    _check(s["patch"], {"kind": str, "file": str, "identity": bool, "base_fingerprint": str}, "summary.patch")
    ev = s["evaluation"]
    _check(ev, {"seed": int, "limit": (int, type(None)), "n_boot": int, "ci": str, "sets": dict}, "summary.evaluation")
    for name, st in ev["sets"].items():
        _check(st, SET, f"summary.evaluation.sets.{name}")
    for name, m in s["metrics"].items():
        _check_metric(m, f"summary.metrics.{name}")
        if m.get("set") not in ev["sets"]:
            raise SchemaError(f"summary.metrics.{name}.set: {m.get('set')!r} is not an evaluation set")
    for cname, c in s["controls"].items():
        _check(c, {"description": str, "members": list, "metrics": dict}, f"summary.controls.{cname}")
        for name, m in c["metrics"].items():
            _check_metric(m, f"summary.controls.{cname}.metrics.{name}", CONTROL_EXTRA)
    if s["retention"] is not None:
        _check(s["retention"], {"limit": (int, type(None)), "seed": int, "benchmarks": dict}, "summary.retention")
        for b, sec in s["retention"]["benchmarks"].items():
            _check(sec, {"protocol": str, "n_items": int, "metrics": dict}, f"summary.retention.benchmarks.{b}")
            for name, m in sec["metrics"].items():
                _check_metric(m, f"summary.retention.benchmarks.{b}.metrics.{name}")
    for k in ("deviations", "notes"):
        if not all(isinstance(x, str) for x in s[k]):
            raise SchemaError(f"summary.{k}: expected a list of strings")
    return s
