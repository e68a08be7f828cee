"""Core verbs: ``biaslab models``, ``benchmarks``, ``audit``, ``export``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import BiaslabError
from ._app import DEVICE_MAP_HELP, MAX_MEMORY_HELP, app, console, err_console, parse_kv, print_result, quiet_mode


@app.command()
def models():
    """List embedded and cached models."""
    from ..models import list_models

    t = Table(title="embedded models")
    t.add_column("name", no_wrap=True)
    for c in ("installed", "converted", "license", "description"):
        t.add_column(c)
    for m in list_models():
        t.add_row(m["name"], "yes" if m["installed"] else f"no: {m['install']}",
                  "yes (verified)" if m["converted"] else f"no: {m['cache_problem']} (the next load converts, ~30 s)",
                  m["license"], m["description"])
    console.print(t)
    console.print("Also accepted: a local Hugging Face model directory, a .gguf file, or an HF id already in the local cache.")


@app.command()
def benchmarks(verbose: bool = typer.Option(False, "--verbose", "-v", help="also print each protocol's description "
                                                                           "and every group's size")):
    """List benchmarks: size, groups, protocols, and what of the published benchmark is here."""
    from collections import Counter

    from ..benchmarks import BENCHMARKS
    from ..evaluation.report import text_table

    rows, protos, groups, sources = [], [], {}, {}
    for name in BENCHMARKS.names():
        b = BENCHMARKS.get(name)()
        items = b.load_items()
        if getattr(b, "sources", None):
            sources[name] = b.sources
        field = b.group_field if any(b.group_field in it for it in items[:50]) else b.strata[0]
        counts = Counter(str(it.get(field)) for it in items)
        groups[name] = (field, counts)
        rows.append([name, f"{len(items):,}", f"{len(counts)} ({field})",
                     ", ".join(p.name + ("*" if p.name == b.default_protocol else "") for p in b.protocols),
                     b.coverage or "–"])
        protos += [(p.id, p.description) for p in b.protocols]
    console.print(text_table("benchmarks", ["benchmark", "items", "groups", "protocols (* default)", "coverage"], rows))
    if verbose:
        for name, (field, counts) in groups.items():
            console.print(f"{name} by {field}: " + ", ".join(f"{g} {n:,}" for g, n in sorted(counts.items())),
                          markup=False, highlight=False, soft_wrap=True)
        for name, srcs in sources.items():  # where each category's file comes from (upstream / regenerated)
            by_label: dict[str, list[str]] = {}
            for cat, v in srcs.items():
                by_label.setdefault(v["label"], []).append(cat)
            for label, cats in by_label.items():
                console.print(f"{name} {label}: {', '.join(cats)}", markup=False, highlight=False, soft_wrap=True)
        for pid, desc in protos:
            console.print(f"{pid}: {desc}", markup=False, soft_wrap=True, highlight=False)
    else:
        console.print("`biaslab benchmarks -v` lists each group's size and describes each protocol.", markup=False)


@app.command()
def audit(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    bench: str = typer.Option("all", "--bench", "-b", help="comma-separated benchmarks, or all"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (required unless --dry-run)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per benchmark (seeded, stratified)"),
    seed: int = typer.Option(0, "--seed"),
    instructions: Optional[int] = typer.Option(None, "--instructions", help="BBQ: number of instruction paraphrases (1-10)"),
    bbq_dir: Optional[Path] = typer.Option(None, "--bbq-dir", "--data-dir",
                                           help="BBQ: your full copy of the upstream data/ folder (sha256-checked; its "
                                                "files replace the 4 categories biaslab regenerates from the "
                                                "templates; or set BIASLAB_BBQ_DIR)"),
    protocol: Optional[list[str]] = typer.Option(None, "--protocol", help="BENCH=PROTOCOL, repeatable"),
    patch: Optional[Path] = typer.Option(None, "--patch", help="apply a patch file while auditing"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
    n_boot: int = typer.Option(1000, "--n-boot", help="bootstrap resamples for the 95% intervals"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="score raw prompts even if the tokenizer has a chat template"),
    format: str = typer.Option("table", "--format", help="table | markdown | csv | json (results on stdout)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print items per benchmark and an estimated time "
                                                          "(a few seconds of calibration); write nothing"),
):
    """Audit a model on bias benchmarks; prints a table and writes OUT/{manifest,results}.json, records.jsonl, report.html."""
    from ..auditing import audit as run_audit
    from ..formats import check_format

    check_format(format)
    if limit is not None and limit <= 0:
        raise BiaslabError(f"--limit must be a positive number of items, got {limit}")
    if out is None and not dry_run:
        raise BiaslabError("--out DIR is required: the run directory the audit writes (or use --dry-run)")
    quiet_mode(quiet)
    if bbq_dir is not None and "bbq" not in bench and bench != "all":
        raise BiaslabError("--bbq-dir (--data-dir) is for the bbq benchmark, which is not being run; add bbq to --bench")
    res = run_audit(model, bench, limit=limit, seed=seed, instructions=instructions,
                    options={"bbq": {"bbq_dir": str(bbq_dir)}} if bbq_dir is not None else None,
                    protocols=parse_kv(protocol, "--protocol"), patch=patch, out=out, force=force, n_boot=n_boot,
                    device=device, dtype=dtype, chat_template=False if no_chat_template else None, dry_run=dry_run,
                    device_map=device_map, max_memory=max_memory)
    print_result(res, format)
    if not dry_run:
        err_console.print(f"run directory: {out} (results.json, report.html)", markup=False, highlight=False)


@app.command()
def export(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m"),
    patch: Path = typer.Option(..., "--patch"),
    out: Path = typer.Option(..., "--out", "-o"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="load the written directory back with transformers alone and compare its logits "
                                     "with the patched model's (default on; needs memory for a second copy)"),
    force: bool = typer.Option(False, "--force", help="write into an existing directory biaslab did not create "
                                                      "(adding files, overwriting and deleting none)"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="the run's summary.json for the model card "
                                                                   "(default: the one beside the patch, if it is this "
                                                                   "patch's run)"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16: the exported weights' "
                                                              "dtype (default: bf16 on GPU, fp32 on CPU)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP + "; the check reloads "
                                                                        "the export with the same map"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
):
    """Bake a patch into a plain Hugging Face model directory (loads with transformers alone)."""
    import json

    from ..models import load_model
    from ..patches import load_patch

    p = load_patch(patch)
    p.export_target(out, force=force)   # a bad --out (or a patch that cannot be exported) fails before the model loads
    card = _run_summary(summary, patch, p)
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    path = p.export(lm, out, verify=verify, force=force, summary=card)
    console.print(f"exported {p.kind} patch onto {model} → {path}", markup=False, highlight=False)
    if verify:
        chk = json.loads((path / "biaslab_patch.json").read_text())["export_check"]
        console.print(f"verified: reloaded with {chk['loaded_with']}, max |logit difference| from the patched model "
                      f"{chk['max_abs_logit_diff']:.2g} (allowed {chk['atol']:g})", highlight=False)


def _run_summary(summary: Path | None, patch_file: Path, patch) -> dict | None:
    """The summary.json that documents ``patch`` (given, or beside the patch file), checked to be about it."""
    import json

    f = summary or patch_file.parent / "summary.json"
    if not f.is_file():
        if summary is not None:
            raise BiaslabError(f"--summary {summary}: no such file")
        return None
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise BiaslabError(f"{f} is not readable JSON") from None
    same = doc.get("patch", {}).get("base_fingerprint") == patch.base_fingerprint and \
        doc.get("patch", {}).get("params") == json.loads(json.dumps(patch.params))
    if not same:
        if summary is not None:
            raise BiaslabError(f"--summary {summary} describes another patch than {patch_file}")
        return None
    return doc


@app.command()
def check(
    run: Path = typer.Argument(..., help="a finished run directory (an audit or a mitigation)"),
    policy: str = typer.Option("default", "--policy", help="a policy YAML file, or a shipped policy name"),
    format: str = typer.Option("table", "--format", help="table | json"),
):
    """Check a run against a release policy: PASS / FAIL / INCONCLUSIVE per rule; exit 0 / 1 / 3."""
    import json

    from ..signoff.policy import EXIT_CODES, check as run_check, format_line, load_policy, load_run, overall

    if format not in ("table", "json"):
        raise BiaslabError(f"--format must be table or json, got {format!r}")
    rules = load_policy(policy)
    results = run_check(load_run(run), rules)
    status = overall(results)
    if format == "json":
        console.print_json(json.dumps({"run": str(run), "policy": policy, "status": status, "rules": results}))
    else:
        for r in results:
            console.print(format_line(r), markup=False, highlight=False, soft_wrap=True)
        console.print(f"{status}: {sum(r['status'] == 'PASS' for r in results)} pass, "
                      f"{sum(r['status'] == 'FAIL' for r in results)} fail, "
                      f"{sum(r['status'] == 'INCONCLUSIVE' for r in results)} inconclusive, "
                      f"{sum(r['status'] == 'SKIP' for r in results)} not measured "
                      f"(policy {policy}, run {run})" + ("; no rule of the policy applies to this run" if all(
                          r["status"] == "SKIP" for r in results) else ""), markup=False, highlight=False,
                      soft_wrap=True)
    raise typer.Exit(EXIT_CODES[status])


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="two or more run directories (audits, mitigations, or states such as "
                                                "DIR/before DIR/after)"),
    format: str = typer.Option("table", "--format", help="table | markdown | csv | json"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write compare.json and compare.html here"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    seed: int = typer.Option(0, "--seed"),
):
    """Compare runs side by side: values with intervals, differences from the first run (paired where the items
    are the same)."""
    from ..evaluation.method import check_positive
    from ..outputs import check_target, preflight
    from ..signoff.compare import FORMATS, compare_runs, render, table_rows, write_html

    if format not in FORMATS:
        raise BiaslabError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_positive("--n-boot", n_boot, allow_none=False, allow_zero=True)
    if out is not None:
        preflight(check_target(out))
    res = compare_runs(runs, n_boot=n_boot, seed=seed)
    if format == "table":
        from ..evaluation.report import text_table

        console.print(text_table("biaslab compare", *table_rows(res)))
        for k, r in enumerate(res["runs"]):
            console.print(f"run {k + 1}: {r}", markup=False, highlight=False)
    else:
        print(render(res, format), end="")
    if out is not None:
        from ..runs import atomic_write_json

        atomic_write_json(out / "compare.json", res)
        write_html(res, out / "compare.html")
        console.print(f"compare.json and compare.html in {out}", markup=False, highlight=False)


@app.command()
def score(
    bench: str = typer.Option(..., "--bench", "-b", help="bbq | crows | stereoset | winobias"),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="JSON Lines: one prediction per item "
                                                                          "(docs/benchmarks.md, 'Scoring predictions')"),
    lmeval_samples: Optional[Path] = typer.Option(None, "--lmeval-samples", help="an lm-evaluation-harness "
                                                                                "--log_samples file (bbq, crows)"),
    items_out: Optional[Path] = typer.Option(None, "--items-out", help="write the benchmark's items (ids and text) "
                                                                       "as JSON Lines to predict elsewhere, then stop"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (results.json, records, report)"),
    partial: bool = typer.Option(False, "--partial", help="score only the predicted items (else every item needs one)"),
    name: str = typer.Option("external", "--name", help="the model's name in the results"),
    text_match: str = typer.Option("biaslab", "--text-match", help="how pred_text is matched to an option: biaslab "
                                   "(letter, normalised text, unknown paraphrases) | bbq-authors (the BBQ authors' R "
                                   "script: exact text, else the first two words of an answer)"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    seed: int = typer.Option(0, "--seed"),
    bbq_dir: Optional[Path] = typer.Option(None, "--bbq-dir", "--data-dir", help="BBQ: your full copy of the upstream "
                                           "data/ folder (sha256-checked; its files replace the categories biaslab "
                                           "regenerates; or set BIASLAB_BBQ_DIR)"),
    force: bool = typer.Option(False, "--force"),
    format: str = typer.Option("table", "--format", help="table | markdown | csv | json"),
):
    """Score predictions made elsewhere (an API model, another harness): the audit's metrics, intervals and report."""
    from ..formats import check_format

    check_format(format)
    if items_out is not None:
        import json

        from ..benchmarks import get_benchmark
        from ..benchmarks.external import BENCHES, items_for_predictions
        from ..outputs import check_target
        from ..runs import atomic_write_text

        if bench not in BENCHES:
            raise BiaslabError(f"biaslab score supports {', '.join(BENCHES)}; not {bench!r}")
        if items_out.exists():
            raise BiaslabError(f"--items-out {items_out} exists; biaslab never overwrites a file it did not create")
        check_target(items_out.parent)
        if bbq_dir is not None and bench != "bbq":
            raise BiaslabError(f"--bbq-dir is BBQ's data; it does nothing for {bench}")
        rows = items_for_predictions(get_benchmark(bench, **({"bbq_dir": str(bbq_dir)} if bbq_dir else {})))
        atomic_write_text(items_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        err_console.print(f"{len(rows):,} {bench} items → {items_out}", markup=False, highlight=False)
        return
    from ..score import score_predictions

    res = score_predictions(bench, predictions=predictions, lmeval_samples=lmeval_samples, out=out, force=force,
                            n_boot=n_boot, seed=seed, partial=partial, model_name=name, text_match=text_match,
                            bbq_dir=bbq_dir)
    print_result(res, format)
    c = res.results["benchmarks"][bench]["predictions"]
    err_console.print(f"{c['scored']:,} items scored ({c['unmatched']} unmatched, {c['items_without_prediction']:,} "
                      f"without a prediction" + (f", {sum(c['docs_left_out'].values()):,} lm-eval docs left out"
                                                  if c.get("docs_left_out") else "") + ")"
                      + (f"; run directory: {out}" if out else ""), markup=False,
                      highlight=False)


@app.command(name="env")
def env_cmd(
    device: Optional[str] = typer.Option(None, "--device", help="what this --device resolves to here (default: auto)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="what this --dtype resolves to here (default: auto)"),
    format: str = typer.Option("text", "--format", help="text | json"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="also plan where this model's weights would go "
                                        "(its config only: nothing is loaded)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
):
    """What this machine and launch give biaslab: each process's device, dtype, GPUs and memory, threads, the
    packages, the cache, and with --model where its weights would go and whether that fits; under torchrun every
    rank, printed by rank 0. Loads and writes nothing."""
    from ..machine import machine_report, render_text

    if format not in ("text", "json"):
        raise BiaslabError(f"--format {format!r}: expected text or json")
    if model is None and (device_map or max_memory):
        raise BiaslabError("--device-map / --max-memory plan a model's placement: give --model with them")
    report = machine_report(device, dtype, model=model, device_map=device_map, max_memory=max_memory)
    if format == "json":
        import json

        print(json.dumps(report, indent=1))
    else:
        print(render_text(report), end="")
