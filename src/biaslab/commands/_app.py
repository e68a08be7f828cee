"""The typer apps and consoles every command module registers on (kept apart from biaslab.cli, which imports
the command modules: no import cycle)."""
from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from ..errors import BiaslabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find social bias in language models and remove it: audit → mitigate → re-audit → ship.")
mitigate_app = typer.Typer(no_args_is_help=True, help="Fit a mitigation, audit before/after, write a patch.")
probe_app = typer.Typer(no_args_is_help=True, help="Bias probes that need training first (soft prompts).")
app.add_typer(mitigate_app, name="mitigate")
app.add_typer(probe_app, name="probe")
# piped or logged output is not cut to 80 columns: a wide layout (tables still fold cells, never truncate them)
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
err_console = Console(stderr=True)


DEVICE_MAP_HELP = ("spread a model larger than one device: auto | balanced | sequential | a JSON object or file "
                   "of module → device (Accelerate big-model inference); under torchrun each process maps onto its "
                   "own block of the node's GPUs, numbered from 0 within it")
MAX_MEMORY_HELP = ("with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (per process under "
                   "torchrun, GPUs numbered within its block)")


def parse_kv(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise BiaslabError(f"{flag} expects BENCH=VALUE, got {v!r}")
        k, _, val = v.partition("=")
        k, val = k.strip(), val.strip()
        if not k or not val:
            raise BiaslabError(f"{flag} expects BENCH=VALUE with both parts, got {v!r}")
        if k in out and out[k] != val:
            raise BiaslabError(f"{flag} is given twice for {k} ({out[k]!r} and {val!r}); give it once")
        out[k] = val
    return out


def quiet_mode(quiet: bool) -> None:
    if quiet:
        from ..progress import set_quiet

        set_quiet(True)


def print_result(res, fmt: str) -> None:
    """Print a result object (AuditResult, DryRun) in ``fmt``: a rich table for ``table`` (long names fold at any
    width), otherwise plain text on stdout, ready to paste or parse."""
    if fmt == "table":
        from ..evaluation.report import text_table

        head, rows = res.table_rows()
        console.print(text_table(res.title() if callable(getattr(res, "title", None)) else res.title, head, rows))
        for n in getattr(res, "notes", []):
            console.print(f"- {n}", markup=False, highlight=False, soft_wrap=True)
    else:
        print(res.render(fmt), end="")
