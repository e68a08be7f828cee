"""The audit: score a model on benchmarks, compute metrics with bootstrap CIs, write a run directory."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

from . import stats
from .audit_result import AuditResult  # noqa: F401  (re-exported: biaslab.auditing.AuditResult)
from .benchmarks import ALL, BENCHMARKS, get_benchmark
from .benchmarks.base import Benchmark, MetricDef, Protocol
from .data import data_path, sha256_file
from .errors import BiaslabError
from .runs import RunDir, Timer, clean_nan, score_journaled

TIE_NOTE_SHARE = 0.01   # a results section notes ties between the two best options from this share of records


def metric_block(records: list[dict], m: MetricDef, *, n_boot: int, seed: int) -> dict:
    instr = sorted({r.get("instruction", 0) for r in records})
    out = stats.bootstrap_ci(records, stats.instruction_mean(m.fn) if len(instr) > 1 else m.fn,
                             n_boot=n_boot if m.ci_method == "percentile" else 0, seed=seed)
    if m.ci_method == "none":
        out["ci_note"] = ("no interval: a bootstrap of a maximum over groups is biased upward, so its percentile "
                          "interval would not bracket the estimate")
    if len(instr) > 1:
        per = [stats._safe(m.fn, [r for r in records if r.get("instruction", 0) == i]) for i in instr]
        out["std"] = stats.mean_std(per)[1]
        out["per_instruction"] = per
    out["scale"] = m.scale
    if m.ideal is not None:
        out["ideal"] = m.ideal
    return out


def summarize(bench: Benchmark, records: list[dict], protocol: Protocol, *, n_boot: int = stats.DEFAULT_BOOT,
              seed: int = 0) -> dict:
    """The results.json section of one benchmark: overall and per-group metrics with 95 % CIs."""
    defs = bench.metric_defs(protocol)
    groups: dict = defaultdict(list)
    for r in records:
        groups[str(r.get(bench.group_field, "all"))].append(r)
    section = {
        "protocol": protocol.id,
        "n_items": len({r["id"] for r in records}),
        "n_records": len(records),
        "metrics": {m.name: metric_block(records, m, n_boot=n_boot, seed=seed) for m in defs},
        "groups": {g: {"n_items": len({r["id"] for r in rs}),
                       "metrics": {m.name: metric_block(rs, m, n_boot=n_boot, seed=seed) for m in defs}}
                   for g, rs in sorted(groups.items())},
        "metric_descriptions": {m.name: m.description for m in defs},
    }
    extra = bench.extra_results(records, protocol)
    if extra:
        section["extra"] = extra
    ties = (extra or {}).get("prediction_tie_share")
    if ties is not None and ties >= TIE_NOTE_SHARE:
        section["notes"] = [f"{ties:.1%} of the scored records tied between their two best options (equal to 6 "
                            "decimals); each went to the first of them, so ties read as a position bias. Check the "
                            "model's dtype and the prompt (experiments/score/bf16_ties.md)"]
    return clean_nan(section)


def score_items(lm, bench: Benchmark, items: list[dict], protocol: Protocol, *, run: RunDir | None = None,
                key: str | None = None) -> list[dict]:
    """Score items chunk by chunk; with a run directory, finished chunks are reused (resume)."""
    return score_journaled(run, key or bench.name, items, bench.chunk_size,
                           lambda part: bench.score(lm, part, protocol=protocol))


def parse_benchmarks(benchmarks) -> list[str]:
    if isinstance(benchmarks, str):
        benchmarks = [b.strip() for b in benchmarks.split(",") if b.strip()]
    if not benchmarks:
        raise BiaslabError("no benchmark given; choose from: " + ", ".join(BENCHMARKS.names()) + " or all")
    if "all" in benchmarks:
        return list(ALL)
    for b in benchmarks:
        BENCHMARKS.get(b)  # raises with did-you-mean
    return list(dict.fromkeys(benchmarks))


def audit(model="smollm2-135m-instruct", benchmarks="all", *, limit: int | None = None, seed: int = 0,
          protocols: dict[str, str] | None = None, instructions: int | None = None, patch=None,
          out: str | Path | None = None, force: bool = False, n_boot: int = stats.DEFAULT_BOOT,
          options: dict[str, dict] | None = None, device: str | None = None, dtype: str | None = None,
          chat_template: bool | None = None, console=None, dry_run: bool = False, device_map=None,
          max_memory=None):
    """Audit ``model`` (spec or LanguageModel) on ``benchmarks``; returns an :class:`AuditResult`.

    protocols: ``{"bbq": "option-loglik"}``; options: per-benchmark options ``{"bbq": {"instructions": 3}}``;
    patch: a Patch or a patch file applied while scoring. With ``out``, writes a resumable run directory.
    ``dry_run``: nothing is written; returns a :class:`~biaslab.evaluation.dryrun.DryRun` (items per benchmark and
    an estimated time from a few seconds of calibration) instead of an :class:`AuditResult`."""
    from .models import LanguageModel, load_model

    from .evaluation.method import check_positive
    from .outputs import check_target, preflight

    check_positive("--limit", limit)
    check_positive("--n-boot", n_boot, allow_none=False, allow_zero=True)
    names = parse_benchmarks(benchmarks)
    if instructions is not None and "bbq" not in names:
        raise BiaslabError(f"--instructions sets the BBQ instruction paraphrases, but bbq is not being run "
                           f"({', '.join(names)}); drop --instructions or add bbq to --bench")
    if out is not None:  # an output directory that cannot be used fails before the model loads
        preflight(check_target(out))
    if patch is not None and not hasattr(patch, "applied"):
        pp = Path(patch)
        if not pp.is_file():
            raise BiaslabError(f"--patch {pp}: {'a directory, not a patch file' if pp.is_dir() else 'no such file'}")
    protocols = dict(protocols or {})
    for b in protocols:
        if b not in names:
            raise BiaslabError(f"--protocol names benchmark {b!r}, which is not being run ({', '.join(names)})")
    options = {k: dict(v) for k, v in (options or {}).items()}
    if instructions is not None:
        options.setdefault("bbq", {})["instructions"] = instructions
    benches = {n: get_benchmark(n, **options.get(n, {})) for n in names}
    protos = {n: benches[n].protocol(protocols.get(n)) for n in names}

    from . import distributed as D

    device = device or D.local_device()   # under NCCL: this rank's GPU
    lm = model if isinstance(model, LanguageModel) else load_model(
        model, device=device, dtype=dtype, chat_template=chat_template, device_map=device_map, max_memory=max_memory)
    patch_obj = None
    if patch is not None:
        from .patches import Patch, load_patch

        patch_obj = patch if isinstance(patch, Patch) else load_patch(patch)
        patch_obj.check_base(lm)
    if dry_run:
        from .evaluation.dryrun import audit_plan

        items = {n: benches[n].sample(benches[n].load_items(), limit, seed) for n in names}
        ctx = patch_obj.applied(lm) if patch_obj else contextlib.nullcontext()
        with ctx:
            return audit_plan(lm, benches, protos, items, title=f"dry run: audit of {lm.spec}")
    args = {"model": lm.spec, **lm.identity(), "benchmarks": names, "limit": limit, "seed": seed,
            "protocols": {n: protos[n].id for n in names}, "options": {n: benches[n].opts for n in names},
            "patch": patch_obj.describe() if patch_obj else None, "chat_template": lm.use_chat_template,
            "n_boot": n_boot}
    run = None
    if out is not None:
        data = {}
        for b in benches.values():
            for f in b.data_files:
                data[f] = "sha256:" + sha256_file(data_path(f))
        run = RunDir(out, args, force=force, extra_manifest={"model": lm.describe(), "data_sha256": data})
    results = {"model": {"spec": lm.spec, **lm.identity()}, "patch": args["patch"], "benchmarks": {}}
    all_records: dict[str, list[dict]] = {}
    ctx = patch_obj.applied(lm) if patch_obj else contextlib.nullcontext()
    with ctx:
        from .progress import current_prefix, stage_prefix

        outer = current_prefix()
        for k, n in enumerate(names):
            t = Timer()
            items = benches[n].sample(benches[n].load_items(), limit, seed)
            with stage_prefix(outer or (f"audit {k + 1}/{len(names)}" if len(names) > 1 else "audit")):
                recs = score_items(lm, benches[n], items, protos[n], run=run)
            all_records[n] = recs
            results["benchmarks"][n] = summarize(benches[n], recs, protos[n], n_boot=n_boot, seed=seed)
            if run:
                run.manifest["timings_s"][n] = t.elapsed()
                run.write_results(results)
                run.write_manifest()
    res = AuditResult(results, all_records, Path(out) if out else None)
    if run and not run.follower:
        run.write_results(results)
        run.finish()
        try:
            from .report.audit import audit_report

            audit_report(res, run.path / "report.html")
        except ImportError:
            pass
    return res
