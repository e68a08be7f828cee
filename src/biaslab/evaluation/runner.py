"""The experiment runner: one audit → mitigate → re-audit loop behind every method.

``run_mitigation(method, model, task, config, out=DIR)`` does, the same way for every registered method:

1. validation of the config and the task (before any model loads), the run directory (``manifest.json`` with
   the model fingerprint, the sha256 of every data file read, the config, seeds, versions, git commit);
2. the fit, cached: ``patch.safetensors`` + ``fit/fit.json`` (+ the fit's own resumable work under ``fit/``),
   reused when the same run is started again;
3. the evaluation sets' item ids (``items.json``), then every state — ``before/``, ``after/``, each control
   member ``controls/<name>/<member>/`` — scored through its run directory's journal (kill it anywhere, rerun,
   the same records); a patch that changes nothing (an empty neuron mask) reuses the before records;
4. paired-bootstrap comparisons (after vs before, after vs each control), the retention audit
   (``retention/before``, ``retention/after``), the versioned summary (:mod:`biaslab.evaluation.schema`), the
   report and the console table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from ..errors import BiaslabError
from ..progress import stage_prefix
from .compare import CI_NOTE, compare_control, compare_metric, retention_comparison, state_metrics
from .method import FitCache, Method, check_positive
from .plan import Control, EvalSet, FitResult
from .schema import SCHEMA_ID, validate_summary


def get_method(method) -> Method:
    from ..methods import METHODS

    return METHODS.get(method)() if isinstance(method, str) else method


def ids_hash(ids) -> str:
    return "sha256:" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _check_sets(sets: list[EvalSet]) -> None:
    seen_sets, seen_metrics = set(), set()
    for s in sets:
        if s.name in seen_sets:
            raise BiaslabError(f"two evaluation sets are named {s.name!r}")
        seen_sets.add(s.name)
        for m in s.metrics:
            if m.name in seen_metrics:
                raise BiaslabError(f"two evaluation sets measure a metric named {m.name!r}")
            seen_metrics.add(m.name)


# ------------------------------------------------------------------------------------------------ fit cache
def _load_fit(out: Path, key: str, lm) -> FitResult | None:
    from ..patches import load_patch

    doc = FitCache(out / "fit").load_json("fit.json", key)
    if doc is None or not (out / "patch.safetensors").is_file():
        return None
    extra = {}
    for name in doc.get("extra_patches", []):
        f = out / "fit" / f"{name}.safetensors"
        if not f.is_file():
            return None
        extra[name] = load_patch(f)
    patch = load_patch(out / "patch.safetensors")
    patch.check_base(lm)
    return FitResult(patch, doc.get("details", {}), doc.get("notes", []), doc.get("deviations", []), extra)


def _save_fit(out: Path, key: str, fit: FitResult) -> None:
    for name, p in fit.extra_patches.items():
        p.save(out / "fit" / f"{name}.safetensors")
    fit.patch.save(out / "patch.safetensors")
    FitCache(out / "fit").save_json("fit.json", key, {
        "details": fit.details, "notes": fit.notes, "deviations": fit.deviations,
        "extra_patches": sorted(fit.extra_patches)})


# ------------------------------------------------------------------------------------------------ states
def score_state(lm, path: Path, state: str, patch, sets: list[EvalSet], *, force: bool,
                reuse: dict[str, list[dict]] | None = None):
    """The raw records of every set in one model state (``patch`` applied, or none), through the state's journal.
    ``reuse``: records taken as they are (a patch that changes nothing), written to the journal, not re-scored.
    Returns (records by set, the state's RunDir)."""
    from ..runs import RunDir, score_journaled

    args = {"state": state, "model": lm.spec, **lm.identity(),
            "patch": patch.describe() if patch is not None else None,
            "sets": {s.name: {"protocol": s.protocol, "ids_hash": ids_hash(s.ids())} for s in sets}}
    rd = RunDir(path, args, force=force, extra_manifest={"model": lm.describe()})
    if patch is not None and not rd.follower:
        patch.save(path / "patch.safetensors")
    out = {}
    ctx = patch.applied(lm) if patch is not None and reuse is None else contextlib.nullcontext()
    with ctx:
        for s in sets:
            if reuse is not None:
                out[s.name] = [dict(r) for r in reuse[s.name]]
                if rd.finished_chunk(s.name, 0) is None:
                    rd.append_chunk(s.name, 0, out[s.name])
            else:
                out[s.name] = score_journaled(rd, s.name, s.items, s.chunk, lambda part, s=s: s.score(lm, part))
    return out, rd


def _referenced(sets, raw: dict, before_raw: dict) -> dict:
    return {s.name: s.reference(raw[s.name], before_raw[s.name]) if s.reference else raw[s.name] for s in sets}


def _state_results(rd, state: str, patch, sets, recs: dict, *, n_boot: int, seed: int) -> None:
    res = {"state": state, "patch": patch.describe() if patch is not None else None, "sets": {}}
    for s in sets:
        sec = {"protocol": s.protocol, "n_items": len({r["id"] for r in recs[s.name]}),
               "metrics": state_metrics(recs[s.name], s.metrics, n_boot=n_boot, seed=seed)}
        if s.group_field:
            groups: dict = {}
            for r in recs[s.name]:
                groups.setdefault(str(r.get(s.group_field, "all")), []).append(r)
            sec["groups"] = {g: {"n_items": len({r["id"] for r in rs}),
                                 "metrics": state_metrics(rs, s.metrics, n_boot=n_boot, seed=seed)}
                             for g, rs in sorted(groups.items())}
        res["sets"][s.name] = sec
    rd.write_results(res)
    rd.finish()
    return res


# ------------------------------------------------------------------------------------------------ the loop
def run_mitigation(method, model="smollm2-135m-instruct", task: str | None = None, config=None, *, out,
                   limit: int | None = None, seed: int = 0, n_boot: int = 1000, force: bool = False,
                   device: str | None = None, dtype: str | None = None, policy="default", console=None,
                   dry_run: bool = False, device_map=None, max_memory=None):
    """Fit ``method`` on ``task``, evaluate before / after / controls on its held-out sets, audit retention; write
    the run directory ``out`` and return the summary (schema :data:`~biaslab.evaluation.schema.SCHEMA_ID`).

    ``config``: the method's config instance, a dict of its fields, a YAML/JSON file or a preset name.
    ``limit``: evaluated items (seeded, stratified). A rerun of the same call resumes; a directory holding a
    different run is refused unless ``force``. ``policy`` (a file or a shipped name) is checked against the result
    and recorded in the summary (``policy``). ``dry_run``: nothing is written or fitted; returns a
    :class:`~biaslab.evaluation.dryrun.DryRun` (items per stage and an estimated time) instead of the summary."""
    from ..data import sha256_file
    from ..models import LanguageModel, load_model
    from ..runs import RunDir, atomic_write_json, clean_nan

    m = get_method(method)
    cfg = config if isinstance(config, m.config_class) else m.make_config(config)
    cfg = m.validate(cfg)
    from ..signoff.policy import load_policy

    load_policy(policy)   # a bad policy file fails before any work
    check_positive("--limit", limit)
    check_positive("--n-boot", n_boot, allow_none=False, allow_zero=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BiaslabError(f"--seed must be an integer, got {seed!r}")
    from ..outputs import check_target, preflight

    if not dry_run:
        preflight(check_target(out))   # a file, or a directory biaslab did not make, fails before the model loads
    say = console.print if console is not None else (lambda *a, **k: None)
    t0, timings = time.perf_counter(), {}

    task_data = m.load_task(task, cfg)           # a bad task file is reported before a model loads
    cfg = m.prepare(cfg, task_data)
    from .. import distributed as D

    device = device or D.local_device()   # under NCCL: this rank's GPU
    from ..models.quantized import require_full_precision

    require_full_precision(f"mitigate {m.name}", spec=model)   # before a quantized checkpoint's weights load
    lm = model if isinstance(model, LanguageModel) else load_model(model, device=device, dtype=dtype,
                                                                           device_map=device_map, max_memory=max_memory)
    require_full_precision(f"mitigate {m.name}", lm=lm)
    if not m.encoder_decoder:
        from ..models.seq2seq import require_decoder_only

        require_decoder_only(lm, m.name)
    m.check_model(lm, cfg)
    if dry_run:
        from .dryrun import mitigation_plan

        return mitigation_plan(m, lm, task_data, cfg, limit=limit, seed=seed)
    out = Path(out)
    cfg_json = m.config_dict(cfg)
    args = {"method": m.name, "method_version": m.version, "model": lm.spec, **lm.identity(),
            "task": task_data.name, "config": cfg_json, "limit": limit, "seed": seed, "n_boot": n_boot}
    data_sha = {label: "sha256:" + sha256_file(Path(p)) for label, p in sorted(task_data.data_files.items())}
    top = RunDir(out, args, force=force, extra_manifest={"kind": "mitigation", "model": lm.describe(),
                                                         "data_sha256": data_sha,
                                                         "task_spec": task_data.spec or task_data.name})

    # 1. fit (cached)
    t = time.perf_counter()
    fit_key = _key({k: args[k] for k in ("method", "method_version", "fingerprint", "dtype", "task", "config", "seed")
                    if k in args})
    fit = None
    if D.is_main():
        with D.local_only():   # rank 0 reads its own files; the others get the result below
            fit = _load_fit(out, fit_key, lm)
    cached = D.broadcast(fit is not None) if D.world_size() > 1 else fit is not None
    if not cached:
        say(f"[fit] {m.name} on {task_data.name}", markup=False, highlight=False)
        # under torch.distributed every rank runs the fit in step (its cache reads are rank 0's, its heavy parts
        # sharded, e.g. CRISPR's attribution); rank 0's result is then the one all ranks use
        with stage_prefix("fit"):
            fit = m.fit(lm, task_data, cfg, seed=seed, cache=FitCache(out / "fit"), log=say)
        if D.is_main():
            _save_fit(out, fit_key, fit)
    if D.world_size() > 1:
        fit = D.broadcast(fit)
    if cached:
        say("[fit] reusing this run's finished fit (patch.safetensors, fit/fit.json)", markup=False)
    timings["fit"] = round(time.perf_counter() - t, 2)
    say(f"{m.name}: {m.headline({'patch': _patch_block(fit.patch), 'details': fit.details})}", markup=False,
        highlight=False)

    # 2. evaluation sets and states
    t = time.perf_counter()
    sets = m.evaluation(lm, task_data, cfg, fit, limit=limit, seed=seed)
    _check_sets(sets)
    if D.is_main():
        atomic_write_json(out / "items.json", {s.name: s.ids() for s in sets})
    controls = m.controls(lm, task_data, cfg, fit)
    plan = m.retention(cfg)
    retained = plan is not None and bool(plan.benchmarks)
    n_steps = 3 + len(controls) + (2 if retained else 0)
    step = lambda k, name: stage_prefix(f"{k}/{n_steps} {name}")  # noqa: E731  (1/N was the fit)
    say(f"[2/{n_steps}] evaluation: {', '.join(f'{s.name} ({len(s.items)} items)' for s in sets)}", markup=False)
    with step(2, "before"):
        raw_before, rd = score_state(lm, out / "before", "before", None, sets, force=force)
    before = _referenced(sets, raw_before, raw_before)
    before_res = _state_results(rd, "before", None, sets, before, n_boot=n_boot, seed=seed)
    identity = fit.patch.is_identity()
    with step(3, "after"):
        raw_after, rd = score_state(lm, out / "after", "after", fit.patch, sets, force=force,
                                    reuse=raw_before if identity else None)
    after = _referenced(sets, raw_after, raw_before)
    after_res = _state_results(rd, "after", fit.patch, sets, after, n_boot=n_boot, seed=seed)
    notes = list(fit.notes)
    if identity:
        notes.append("the patch changes nothing: 'after' (and every control that changes nothing) reuses the "
                     "'before' records instead of scoring them again")
    timings["evaluation"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    ctrl_recs: dict[str, list[dict]] = {}
    for k, c in enumerate(controls):
        say(f"[{4 + k}/{n_steps}] control: {c.name}", markup=False)
        with step(4 + k, f"control {c.name}"):
            ctrl_recs[c.name] = _score_control(lm, out, c, sets, raw_before, before, force=force, n_boot=n_boot,
                                               seed=seed)
    timings["controls"] = round(time.perf_counter() - t, 2)

    metrics, ctrl_blocks = {}, {}
    for s in sets:
        for spec in s.metrics:
            metrics[spec.name] = compare_metric(before[s.name], after[s.name], spec, s.name, n_boot=n_boot, seed=seed)
            metrics[spec.name]["before_ci95"] = before_res["sets"][s.name]["metrics"][spec.name]["ci95"]
            metrics[spec.name]["after_ci95"] = after_res["sets"][s.name]["metrics"][spec.name]["ci95"]
    for c in controls:
        ctrl_blocks[c.name] = {"description": c.description, "members": c.labels, "metrics": {
            spec.name: compare_control(before[s.name], after[s.name], [mr[s.name] for mr in ctrl_recs[c.name]], spec,
                                       s.name, n_boot=n_boot, seed=seed)
            for s in sets for spec in s.metrics}}

    # 3. retention
    retention = None
    if retained:
        t = time.perf_counter()
        k = 4 + len(controls)
        say(f"[{k}-{k + 1}/{n_steps}] retention: {', '.join(plan.benchmarks)} before / after", markup=False)
        retention = {"limit": plan.limit, "seed": seed, "benchmarks": retention_comparison(
            lm, fit.patch, plan.benchmarks, limit=plan.limit, seed=seed, n_boot=n_boot, out=out / "retention",
            force=force, steps=(f"{k}/{n_steps} retention before", f"{k + 1}/{n_steps} retention after"))}
        timings["retention"] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)

    summary = {
        "schema": SCHEMA_ID, "method": m.name, "method_version": m.version, "task": task_data.name,
        "model": {"spec": lm.spec, **lm.identity()},   # dtype too when not float32
        "patch": _patch_block(fit.patch),
        "evaluation": {"seed": seed, "limit": limit, "n_boot": n_boot, "ci": CI_NOTE, "sets": {
            s.name: {"n_items": len(s.items), "protocol": s.protocol, "ids_hash": ids_hash(s.ids()),
                     "ids_file": "items.json"} for s in sets}},
        "metrics": metrics, "controls": ctrl_blocks, "retention": retention,
        "details": fit.details, "deviations": list(fit.deviations), "notes": notes, "config": cfg_json,
        "timings_s": timings,
    }
    from ..signoff.policy import check, load_policy, overall

    summary = clean_nan(json.loads(json.dumps(summary, default=str)))
    results = check(summary, load_policy(policy))
    summary["policy"] = {"policy": str(policy), "status": overall(results), "rules": results}
    summary = validate_summary(summary)
    if D.is_main():
        atomic_write_json(out / "summary.json", summary)
        from .report import write_report

        write_report(m, summary, out / "report.html")
    top.finish(timings_s=timings)
    return summary


def _patch_block(patch) -> dict:
    return {**patch.describe(), "file": "patch.safetensors", "identity": patch.is_identity(),
            "exportable": patch.exportable}


def _score_control(lm, out: Path, c: Control, sets, raw_before: dict, before: dict, *, force: bool, n_boot: int,
                   seed: int) -> list[dict]:
    """Records of each member of a control (referenced like every state)."""
    from ..runs import RunDir

    base = out / "controls" / c.name
    if c.derive is not None:
        recs = c.derive(before)
        rd = RunDir(base / c.labels[0], {"state": f"control:{c.name}", "derived_from": "before",
                                         "sets": {s.name: ids_hash(s.ids()) for s in sets}}, force=force)
        for s in sets:
            if rd.finished_chunk(s.name, 0) is None:
                rd.append_chunk(s.name, 0, recs[s.name])
        _state_results(rd, f"control:{c.name}", None, sets, recs, n_boot=n_boot, seed=seed)
        return [recs]
    members = []
    from ..progress import current_prefix

    outer = current_prefix()
    for k, (label, p) in enumerate(zip(c.labels, c.members)):
        with stage_prefix(f"{outer} ({label}, {k + 1} of {len(c.members)})"):
            raw, rd = score_state(lm, base / label, f"control:{c.name}/{label}", p, sets, force=force,
                                  reuse=raw_before if p.is_identity() else None)
        recs = _referenced(sets, raw, raw_before)
        _state_results(rd, f"control:{c.name}/{label}", p, sets, recs, n_boot=n_boot, seed=seed)
        members.append(recs)
    return members
