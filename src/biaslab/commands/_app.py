"""The typer apps and consoles every command module registers on (kept apart from biaslab.cli, which imports
the command modules: no import cycle)."""
from __future__ import annotations

import typer
from rich.console import Console

from ..errors import BiaslabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find social bias in language models and remove it: audit → mitigate → re-audit → ship.")
mitigate_app = typer.Typer(no_args_is_help=True, help="Fit a mitigation, audit before/after, write a patch.")
probe_app = typer.Typer(no_args_is_help=True, help="Bias probes that need training first (soft prompts).")
app.add_typer(mitigate_app, name="mitigate")
app.add_typer(probe_app, name="probe")
console = Console()
err_console = Console(stderr=True)


def parse_kv(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise BiaslabError(f"{flag} expects BENCH=VALUE, got {v!r}")
        k, _, val = v.partition("=")
        out[k.strip()] = val.strip()
    return out
