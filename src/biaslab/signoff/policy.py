"""Release policies: a small YAML file of thresholds, checked against a run with its intervals.

``biaslab check RUN --policy FILE`` prints one line per rule — PASS, FAIL, or INCONCLUSIVE when the 95 % interval
straddles the threshold — and exits 0 / 1 / 3, so a CI pipeline can gate a release on it. The rule syntax is in
the shipped default policy (``biaslab/signoff/policies/default.yaml``, docs/SIGNOFF.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BiaslabError

POLICY_DIR = Path(__file__).resolve().parent / "policies"
LEVEL_OPS = ("abs_max", "within", "min", "max")
CHANGE_OPS = ("drop_max", "increase_max", "rel_increase_max")
OPS = LEVEL_OPS + CHANGE_OPS
STATUSES = ("PASS", "FAIL", "INCONCLUSIVE", "SKIP")
EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}


@dataclass(frozen=True)
class Rule:
    key: str          # SCOPE.METRIC
    op: str
    threshold: object  # a number, or [lo, hi] for within
    line: int

    @property
    def scope(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def metric(self) -> str:
        return self.key.split(".", 1)[1]

    def describe(self) -> str:
        t = f"[{self.threshold[0]:g}, {self.threshold[1]:g}]" if self.op == "within" else f"{self.threshold:g}"
        return f"{self.key} {self.op} {t}"


def resolve_policy(spec) -> Path:
    """A policy file, or a shipped policy by name (``default``)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = POLICY_DIR / f"{spec}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    raise BiaslabError(f"--policy {spec}: no such file (shipped policies: "
                       f"{', '.join(sorted(x.stem for x in POLICY_DIR.glob('*.yaml')))})")


def load_policy(spec="default") -> list[Rule]:
    """Parse a policy file; a bad rule is an error naming the file, line and key."""
    import yaml

    path = resolve_policy(spec)
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BiaslabError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BiaslabError(f"{path}{f', line {mark.line + 1}' if mark else ''}: not valid YAML "
                           f"({getattr(e, 'problem', None) or e})") from None
    if node is None:
        return []
    if not isinstance(node, yaml.MappingNode):
        raise BiaslabError(f"{path}: a policy is a mapping of SCOPE.METRIC: {{rule: threshold}}")
    rules = []
    for knode, vnode in node.value:
        line, key = knode.start_mark.line + 1, knode.value
        where = f"{path}, line {line}, key {key!r}"
        if not isinstance(key, str) or key.count(".") < 1 or not all(key.split(".", 1)):
            raise BiaslabError(f"{where}: keys are SCOPE.METRIC (e.g. crows.stereotype_score)")
        value = yaml.safe_load(yaml.serialize(vnode))
        if not isinstance(value, dict) or not value:
            raise BiaslabError(f"{where}: expected a mapping of rules, e.g. {{abs_max: 5}}")
        for op, t in value.items():
            if op not in OPS:
                import difflib

                close = difflib.get_close_matches(str(op), OPS, n=1)
                raise BiaslabError(f"{where}: unknown rule {op!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                   + f" (rules: {', '.join(OPS)})")
            if op == "within":
                ok = isinstance(t, list) and len(t) == 2 and all(_num(x) for x in t) and t[0] <= t[1]
                if not ok:
                    raise BiaslabError(f"{where}: within expects [lo, hi] with lo <= hi, got {t!r}")
                t = [float(t[0]), float(t[1])]
            elif not _num(t):
                raise BiaslabError(f"{where}: {op} expects a number, got {t!r}")
            else:
                t = float(t)
            rules.append(Rule(key, op, t, line))
    return rules


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(value, ci):
    if value is None:
        return None
    if ci and ci[0] is not None and ci[1] is not None:
        return float(ci[0]), float(ci[1])
    return float(value), float(value)


def _judge(op: str, t, lo: float, hi: float) -> str:
    if op == "abs_max":
        return "PASS" if max(abs(lo), abs(hi)) <= t else "FAIL" if lo > t or hi < -t else "INCONCLUSIVE"
    if op == "within":
        return "PASS" if t[0] <= lo and hi <= t[1] else "FAIL" if hi < t[0] or lo > t[1] else "INCONCLUSIVE"
    if op in ("min",):
        return "PASS" if lo >= t else "FAIL" if hi < t else "INCONCLUSIVE"
    # max, increase_max and rel_increase_max bound the value / change from above; drop_max is turned into that
    return "PASS" if hi <= t else "FAIL" if lo > t else "INCONCLUSIVE"


def _lookup(run: dict, rule: Rule) -> tuple[dict | None, str]:
    """The metric block a rule reads, and what kind of run it is (audit | mitigation)."""
    if "benchmarks" in run and "schema" not in run:            # an audit's results.json
        sec = run["benchmarks"].get(rule.scope)
        return (sec or {}).get("metrics", {}).get(rule.metric), "audit"
    if rule.scope == "task":
        return run.get("metrics", {}).get(rule.metric), "mitigation"
    sec = ((run.get("retention") or {}).get("benchmarks") or {}).get(rule.scope)
    return (sec or {}).get("metrics", {}).get(rule.metric), "mitigation"


def check(run: dict, rules: list[Rule]) -> list[dict]:
    """One result per rule: status, the value and interval judged, and a note for SKIP."""
    out = []
    for r in rules:
        block, kind = _lookup(run, r)
        res = {"rule": r.describe(), "key": r.key, "op": r.op, "threshold": r.threshold, "line": r.line}
        if block is None:
            out.append({**res, "status": "SKIP", "note": "not measured in this run"})
            continue
        if r.op in LEVEL_OPS:
            value, ci = (block.get("value"), block.get("ci95")) if kind == "audit" else (block.get("after"),
                                                                                         block.get("after_ci95"))
            what = "value" if kind == "audit" else "after"
        elif kind == "audit":
            out.append({**res, "status": "SKIP", "note": "a change rule needs a before / after (mitigation) run"})
            continue
        elif r.op == "rel_increase_max":
            value, ci, what = block.get("relative_change"), block.get("relative_change_ci95"), "relative change"
        else:
            value, ci, what = block.get("delta"), block.get("delta_ci95"), "after − before"
        iv = _interval(value, ci)
        if iv is None or math.isnan(iv[0]):
            out.append({**res, "status": "SKIP", "note": f"{what} is undefined"})
            continue
        lo, hi = iv
        if not ci:  # a point value cannot be vouched for: no PASS or FAIL without an interval
            out.append({**res, "status": "INCONCLUSIVE", "judged": what, "value": value, "interval": [lo, hi],
                        "interval_is_point": True, "note": "no interval (a run with --n-boot 0, or an older summary)"})
            continue
        t = r.threshold
        if r.op == "drop_max":   # before − after <= t  ⇔  after − before >= −t
            status = "PASS" if lo >= -t else "FAIL" if hi < -t else "INCONCLUSIVE"
        else:
            status = _judge(r.op, t, lo, hi)
        out.append({**res, "status": status, "judged": what, "value": value, "interval": [lo, hi],
                    "interval_is_point": not ci})
    return out


def overall(results: list[dict]) -> str:
    """FAIL if any rule fails, else INCONCLUSIVE if any is inconclusive — or if no rule was measured at all (a
    policy none of whose rules applies to the run vouches for nothing) — else PASS."""
    s = {r["status"] for r in results}
    if "FAIL" in s:
        return "FAIL"
    return "INCONCLUSIVE" if "INCONCLUSIVE" in s or not s - {"SKIP"} else "PASS"


def format_line(r: dict) -> str:
    if r["status"] == "SKIP":
        return f"SKIP          {r['rule']}: {r['note']}"
    lo, hi = r["interval"]
    iv = "(no interval: cannot be judged)" if r.get("interval_is_point") else f"[{lo:.3g}, {hi:.3g}]"
    return f"{r['status']:<13} {r['rule']}: {r['judged']} {r['value']:.4g} {iv}"


def load_run(path) -> dict:
    """A run directory's summary.json (a mitigation) or results.json (an audit)."""
    import json

    p = Path(path)
    for name in ("summary.json", "results.json"):
        f = p / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                raise BiaslabError(f"{f} is not readable JSON") from None
            if name == "results.json" and doc.get("complete") is False:
                raise BiaslabError(f"{f} belongs to a run that did not finish; rerun it before checking it")
            if name == "results.json" and "sets" in doc and "benchmarks" not in doc:   # DIR/before, DIR/after, …
                raise BiaslabError(f"{p} is the {doc.get('state', 'one')!r} state of a mitigation run: its rules judge "
                                   f"the run's before / after, so check the run directory ({p.parent})")
            if name == "results.json" and "benchmarks" not in doc:   # a probe's or a rewrite's run directory
                raise BiaslabError(f"{f} is neither an audit's results nor a mitigation's summary (a soft-prompt probe "
                                   "or a rewrite run?): biaslab check judges audits and mitigations")
            return doc
    raise BiaslabError(f"{p} holds no summary.json or results.json: not a finished biaslab run directory")
