"""`biaslab mitigate crispr`: bias neuron elimination (METHODS.md §1) — attribute on dev items, prune the top
neurons, evaluate before / after / random control on held-out test items, retention benchmarks before/after."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli import console, mitigate_app
from ..errors import BiaslabError


@mitigate_app.command("crispr")
def crispr(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    task: Optional[str] = typer.Option(None, "--task", help="bbq:Age | bbq:Age,Religion | bbq:all | sst2 | mc:PATH (your own "
                                      "multiple-choice task as JSON Lines; see docs/methods/crispr.md)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    neurons: Optional[int] = typer.Option(None, "--neurons", help="prune this many top bias neurons"),
    search: bool = typer.Option(False, "--search", help="choose n by golden-section search on dev accuracy"),
    search_max: int = typer.Option(500, "--search-max", help="upper end of the searched n interval [0, max]"),
    search_dev_limit: Optional[int] = typer.Option(None, "--search-dev-limit",
                                                   help="dev items scored per search step (default: the whole dev split)"),
    search_objective: str = typer.Option("accuracy", "--search-objective",
                                         help="dev objective of the search: accuracy (released code) | accuracy+goldprob "
                                              "(accuracy, ties broken by the mean gold-option probability; a deviation) | "
                                              "condition-hmean (BBQ: harmonic mean of ambiguous and disambiguated "
                                              "accuracy, so 'unknown' to everything scores 0; a deviation)"),
    protocol: Optional[str] = typer.Option(None, "--protocol",
                                           help="letter (default; options listed with letters, chat template) | cloze "
                                                "(plain-text completion prompt, options' first words scored; e.g. SST-2 "
                                                "'Review: … Sentiment:') | option-loglik (options' texts "
                                                "scored as continuations, chat template; for options whose first words "
                                                "coincide, e.g. BBQ)"),
    search_small: int = typer.Option(0, "--search-small",
                                     help="also try every n in 1..K on dev (a deviation: guards the golden-section "
                                          "search against plateaus that hide a peak at small n)"),
    sites: str = typer.Option("ffn", "--sites", help="ffn (FFN intermediate neurons) | linear (every linear output unit)"),
    instructions: Optional[int] = typer.Option(None, "--instructions", help="number of instruction paraphrases used (default: all 10 "
                                              "generic ones, or all of an mc: task file's own)"),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="test items evaluated (seeded, stratified)"),
    dev_size: Optional[int] = typer.Option(None, "--dev-size", help="dev instances per attribution trial (default 20)"),
    trials: int = typer.Option(1, "--trials", help="attribution trials (dev samples) averaged"),
    control_seeds: Optional[int] = typer.Option(None, "--control-seeds", help="random-pruning control seeds (default 3)"),
    reduce: str = typer.Option("max", "--reduce", help="token reduction: max (paper) | mean (ablation)"),
    span: str = typer.Option("all", "--span", help="positions reduced over: all (prompt and answer positions; "
                                                   "default) | prompt (without the answer positions) | answer"),
    no_confusion_weighting: bool = typer.Option(False, "--no-confusion-weighting", help="ablation: α ≡ 1"),
    no_skill_disentanglement: bool = typer.Option(False, "--no-skill-disentanglement", help="ablation: B = A(ŷ)"),
    objective: str = typer.Option("logprob", "--objective",
                                  help="logprob (convention logp-alpha, released code) | prob (p-alpha, paper literal)"),
    retention: bool = typer.Option(True, "--retention/--no-retention", help="re-run crows, stereoset, retention before/after"),
    retention_limit: Optional[int] = typer.Option(None, "--retention-limit", help="items per retention benchmark (default 50)"),
    demo: bool = typer.Option(False, "--demo", help="the `make demo` preset: sst2 under the cloze protocol, 3 instructions, 20 dev "
                              "instances, short search n ∈ [0, 16] on 60 dev items, 100 test items, 3 control seeds, "
                              "retention limit 20"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
):
    """Find bias neurons by attribution and prune them; audit before / after / random control."""
    from ..mitigations.crispr import DEMO, CrisprConfig, run

    if demo:
        task = task or DEMO["task"]
        protocol = protocol or (DEMO["protocol"] if task == DEMO["task"] else None)
        instructions = instructions or DEMO["instructions"]
        test_limit = test_limit or DEMO["test_limit"]
        if neurons is None and not search:
            search = DEMO["search"]
            search_max = min(search_max, DEMO["search_max"])
            search_dev_limit = search_dev_limit or DEMO["search_dev_limit"]
        dev_size = dev_size or DEMO["dev_size"]
        control_seeds = DEMO["control_seeds"] if control_seeds is None else control_seeds
        retention_limit = retention_limit or DEMO["retention_limit"]
    if task is None:
        raise BiaslabError("--task is required (bbq:<Category>, bbq:all, sst2 or mc:PATH), or use --demo")
    # instructions=None: all the task's own (resolved once the task is loaded, in run())
    cfg = CrisprConfig(sites=sites, protocol=protocol or "letter", instructions=instructions, reduce=reduce, span=span, objective=objective,
                       confusion_weighting=not no_confusion_weighting,
                       skill_disentanglement=not no_skill_disentanglement, dev_size=dev_size or 20, trials=trials,
                       neurons=neurons, search=search, search_max=search_max, search_dev_limit=search_dev_limit,
                       search_objective=search_objective, search_small=search_small)
    summary = run(model, task, out=out, config=cfg, test_limit=test_limit,
                  control_seeds=3 if control_seeds is None else control_seeds, retention=retention,
                  retention_limit=50 if retention_limit is None else retention_limit, n_boot=n_boot, force=force,
                  console=console)
    _print_summary(summary)
    console.print(f"run directory: {out} (summary.json, report.html, patch.safetensors)")


def _print_summary(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    def ci(c):
        return f"[{f(c[0])}, {f(c[1])}]" if c else "–"

    # names come from the data (a task file's name and groups): escaped, or rich reads "accuracy[neg]" as markup
    t = Table(title=f"CRISPR on {escape(summary['task'])}: {summary['patch']['n_neurons']} neurons pruned "
                    f"({summary['evaluation']['n_test_items']} test items)")
    for c in ("metric", "before", "after", "Δ (95% CI)", "control", "CRISPR−control (95% CI)"):
        t.add_column(c)
    for name, m in summary["metrics"].items():
        c = summary["control"].get("metrics", {}).get(name, {})
        t.add_row(escape(name), f"{f(m['before'])} ± {f(m.get('std_before'))}", f"{f(m['after'])} ± {f(m.get('std_after'))}",
                  f"{f(m['delta'])} {ci(m.get('delta_ci95'))}", f(c.get("value")),
                  f"{f(c.get('crispr_minus_control'))} {ci(c.get('crispr_minus_control_ci95'))}")
    console.print(t)
    if summary.get("retention"):
        r = Table(title="retention")
        for c in ("benchmark", "metric", "before", "after", "Δ (95% CI)"):
            r.add_column(c)
        for b, sec in summary["retention"].items():
            for name, m in sec["metrics"].items():
                r.add_row(b, name, f(m["before"]), f(m["after"]), f"{f(m['delta'])} {ci(m.get('delta_ci95'))}")
        console.print(r)
