"""``biaslab score``: the audit's metrics, intervals, groups, run directory and report for predictions a model made
elsewhere (an API model, another harness) — how a user audits a model biaslab cannot run.
Formats: :mod:`biaslab.benchmarks.external`."""
from __future__ import annotations

from pathlib import Path

from . import stats
from .auditing import summarize
from .audit_result import AuditResult
from .errors import BiaslabError

EXTERNAL_PROTOCOL = {"bbq": "bbq.external.v1", "winobias": "winobias.external.v1", "crows": "crows.external.v1",
                     "stereoset": "stereoset.external.v1"}


def score_predictions(bench: str, *, predictions=None, lmeval_samples=None, out=None, force: bool = False,
                      n_boot: int = stats.DEFAULT_BOOT, seed: int = 0, partial: bool = False,
                      model_name: str = "external", text_match: str = "biaslab", bbq_dir=None) -> AuditResult:
    """Score ``predictions`` (our JSON Lines) or ``lmeval_samples`` (an lm-eval ``--log_samples`` file) on
    ``bench``. With ``out``, writes a run directory like an audit's (records, results, report). ``bbq_dir``: the
    user's upstream BBQ data/ folder, as for an audit (its categories replace the regenerated ones)."""
    from .benchmarks import get_benchmark
    from .benchmarks.external import from_lmeval_samples, read_predictions, to_records
    from .data import sha256_file
    from .outputs import check_target, preflight

    if (predictions is None) == (lmeval_samples is None):
        raise BiaslabError("give exactly one of --predictions FILE or --lmeval-samples FILE")
    if out is not None:
        preflight(check_target(out))
    if bbq_dir is not None and bench != "bbq":
        raise BiaslabError(f"--bbq-dir is BBQ's data; it does nothing for {bench}")
    b = get_benchmark(bench, **({"bbq_dir": str(bbq_dir)} if bbq_dir is not None else {}))
    src = Path(predictions or lmeval_samples)
    rows, left_out = (read_predictions(src), {}) if predictions is not None else \
        from_lmeval_samples(b, src, partial=partial)
    records, counts = to_records(b, rows, src, partial=partial, text_match=text_match)
    if predictions is None:
        counts["docs_left_out"] = left_out
    # the metrics are the benchmark's own, as under its default protocol (they read only the records' fields)
    proto = b.protocol()
    section = summarize(b, records, proto, n_boot=n_boot, seed=seed)
    section["protocol"] = EXTERNAL_PROTOCOL[bench]
    section["predictions"] = {"file": str(src), "sha256": "sha256:" + sha256_file(src),
                              "format": "biaslab.predictions.v1" if predictions is not None else "lm-eval log_samples",
                              "metric_definitions_from": proto.id, "text_match": text_match, **counts}
    for why, k in left_out.items():
        section.setdefault("notes", []).append(f"{k} lm-eval docs left out (--partial): {why}")
    if counts["unmatched"]:
        section.setdefault("notes", []).append(f"{counts['unmatched']} answers matched no option and were left out "
                                               "(as the BBQ authors' analysis drops them)")
    results = {"model": {"spec": model_name, "fingerprint": "external:" + section["predictions"]["sha256"]},
               "patch": None, "benchmarks": {bench: section}}
    res = AuditResult(results, {bench: records}, Path(out) if out else None)
    if out is not None:
        from .runs import RunDir

        run = RunDir(out, {"score": bench, "predictions": section["predictions"]["sha256"], "n_boot": n_boot,
                           "seed": seed, "partial": partial, "text_match": text_match,
                           **({"bbq_dir": str(bbq_dir)} if bbq_dir is not None else {})}, force=force,
                     extra_manifest={"model": results["model"], "data_sha256": {str(src): section["predictions"]["sha256"]}})
        if run.finished_chunk(bench, 0) is None:
            run.append_chunk(bench, 0, records)
        run.write_results(results)
        run.finish()
        from .report.audit import audit_report

        audit_report(res, run.path / "report.html")
    return res
