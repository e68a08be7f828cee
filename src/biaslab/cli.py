"""biaslab command line: a thin layer over the Python API. Errors print one clear line, never a traceback
(set BIASLAB_DEBUG=1 for one)."""
from __future__ import annotations

import os
import sys

from rich.markup import escape

from .commands import core, mitigate, rewrite, softprompt  # noqa: F401  (each registers its commands)
from .commands._app import app, err_console, mitigate_app, probe_app  # noqa: F401
from .errors import BiaslabError


def main() -> None:
    try:
        app()
    except BiaslabError as e:
        if os.environ.get("BIASLAB_DEBUG"):
            raise
        # the message may quote user input (paths, field values): escaped, so "[...]" in it is printed, not parsed
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is kept in the run directory, rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
