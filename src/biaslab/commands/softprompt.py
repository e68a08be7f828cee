"""``biaslab probe softprompt``: the soft-prompt bias audit (docs/methods/softprompt.md, Tian et al. 2023)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import DEVICE_MAP_HELP, MAX_MEMORY_HELP, err_console, console, probe_app
from ..errors import BiaslabError


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BiaslabError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not vals:
        raise BiaslabError(f"{flag} is empty")
    return vals


@probe_app.command("softprompt")
def softprompt(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    runs: int = typer.Option(5, "--runs", help="soft-prompt runs kept (top R by dev accuracy)"),
    virtual_tokens: int = typer.Option(8, "--virtual-tokens", help="k, the soft prompt's length"),
    train_limit: int = typer.Option(384, "--train-limit", help="SST-5 train sentences used for prompt tuning (seeded sample)"),
    val_limit: int = typer.Option(150, "--val-limit", help="SST-5 dev sentences for selecting runs"),
    test_limit: int = typer.Option(250, "--limit", "--test-limit", help="SST-5 test sentences for the reported "
                                                                       "accuracy (--test-limit: the old name)"),
    template_limit: int = typer.Option(795, "--template-limit",
                                       help="template sentences probed (stratified by category, group, label); 0 = all 31,972"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="sweep: comma-separated seeds"),
    lrs: str = typer.Option("0.005,0.01", "--lrs", help="sweep: comma-separated learning rates"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(16, "--batch-size"),
    micro_batch_size: Optional[int] = typer.Option(
        None, "--micro-batch-size", help="sentences per gradient part: each batch is cut into parts shared across "
                                         "processes (torchrun), the same prompts as 1 process with the same value; "
                                         "default: each prompt trained whole on one process"),
    max_length: int = typer.Option(64, "--max-length", help="sentence tokens kept"),
    no_hand: bool = typer.Option(False, "--no-hand-prompts", help="skip the hand-written prompt comparison"),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache",
                                                help="trained-prompt cache (default $BIASLAB_CACHE/softprompts)"),
    seed: int = typer.Option(0, "--seed", help="data sampling seed"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
    format: str = typer.Option("table", "--format", help="table | markdown | csv | json (results on stdout)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
):
    """Prompt-tune the frozen model on SST-5 (3 classes), then measure per-group FPR/TPR gaps on the Czarnowska
    templates with 95 % intervals over runs, next to hand-written prompts. Trained prompts are cached and reused."""
    from ..probes.pipeline import run_probe
    from ..probes.softprompt import HAND_PROMPTS

    from ..formats import check_format, csv_table, markdown_table
    from ._app import quiet_mode

    check_format(format)
    quiet_mode(quiet)
    seed_list = [int(s) for s in _floats(seeds, "--seeds")]
    res = run_probe(model, out, runs=runs, virtual_tokens=virtual_tokens, train_limit=train_limit, val_limit=val_limit,
                    test_limit=test_limit, template_limit=template_limit or None, seeds=seed_list,
                    lrs=_floats(lrs, "--lrs"), epochs=epochs, batch_size=batch_size, max_length=max_length,
                    hand_prompts=() if no_hand else HAND_PROMPTS, prompt_cache=prompt_cache, seed=seed, force=force,
                    micro_batch_size=micro_batch_size, console=err_console, device=device, dtype=dtype,
                    device_map=device_map, max_memory=max_memory)
    head = ["prompt", "kind", "test acc", "template acc"]
    rows = [[pid, a["kind"], f"{a['test']:.3f}", f"{a['templates']:.3f}"] for pid, a in res["accuracy"].items()]
    flags = [[c, g, m, f"{res['fairness']['soft'][c]['groups'][g][m]['mean']:+.3f}"] for c, g, m in res["flags"]["soft"]]
    if format != "table":
        import json

        if format == "json":
            print(json.dumps(res, indent=2, default=str))
        elif format == "csv":
            print(csv_table(head, rows), end="")
        else:
            print(markdown_table(head, rows) + "\nflagged (category, group, FPR metric, gap):\n\n" +
                  markdown_table(["category", "group", "metric", "gap"], flags), end="")
        err_console.print(f"run directory: {out}", markup=False, highlight=False)
        return
    from ..formats import text_table

    console.print(text_table(f"soft-prompt probe — {res['model']['spec']} ({res['protocol']})", head, rows))
    console.print(f"flagged (category, group, FPR metric): {len(res['flags']['soft'])}")
    for c, g, m in res["flags"]["soft"]:
        console.print(f"  {c} / {g} / {m}: gap {res['fairness']['soft'][c]['groups'][g][m]['mean']:+.3f}", markup=False)
    if res.get("comparison"):
        e = res["comparison"]["hand_ensemble_vs_soft"]
        console.print(f"hand-written prompts as runs: flags kept {e['kept']}, lost {e['lost']}, gained {e['gained']}")
    console.print(f"CPU {res['cpu_s']['total']} s; run directory: {out}", markup=False, highlight=False)
