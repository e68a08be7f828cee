"""Result formats every verb that prints results accepts (``--format table|markdown|csv|json``): one place for the
names, the markdown table (copy-pasteable, like lm-evaluation-harness's) and the CSV writer."""
from __future__ import annotations

import csv
import io

from .errors import BiaslabError

FORMATS = ("table", "markdown", "csv", "json")


def check_format(fmt: str, allowed=FORMATS) -> str:
    if fmt not in allowed:
        raise BiaslabError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}")
    return fmt


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; ``|`` and newlines inside cells are escaped."""
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(head: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(rows)
    return buf.getvalue()


def text_table(title: str, head: list[str], rows: list[list[str]]):
    """A rich table whose every cell is plain text (names come from the data: never read as markup); long cells
    fold instead of being cut."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title))
    for h in head:
        t.add_column(Text(h), overflow="fold")
    for r in rows:
        t.add_row(*[Text(c) for c in r])
    return t
