"""One progress bar style for all long work (items/s shown). ``BIASLAB_PROGRESS=0`` turns bars off."""
from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def progress_enabled(flag: bool | None = None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("BIASLAB_PROGRESS", "1") not in ("0", "false", "no")


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # items per second
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int, desc: str, *, unit: str = "items", enabled: bool | None = None):
    """Yields ``advance(n=1, **fields)``; a no-op when disabled or total is 0."""
    if not progress_enabled(enabled) or total <= 0:
        yield lambda n=1, **kw: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=_console, transient=False) as prog:
        task = prog.add_task(desc, total=total, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            prog.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
