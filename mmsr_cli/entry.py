"""The `mmsr` console script: imports the CLI (Typer, Rich: about 0.1 s) inside a Ctrl-C guard.

``app.main`` turns Ctrl-C into one line and exit 130 once it runs; a Ctrl-C while the CLI is
still being imported would otherwise print a traceback. This module imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
import sys

INTERRUPTED = "mmsr: interrupted; completed outputs are kept, re-run to resume"


def run() -> None:
    try:
        app = importlib.import_module("mmsr_cli.app")
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED + "\n")
        sys.exit(130)
    app.main()
