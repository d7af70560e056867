"""The ``chimera`` command line: the parser, assembled from each group's ``register``, and the
one error path. Each subcommand turns its arguments into configs at once and calls library
functions; bad input (see ``cluster.cli.errors``) prints one line on stderr and exits with
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape

from cluster.cli import alignment, dashboard, data, evaluation, models, runs, serving
from cluster.cli.errors import user_errors

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera",
        description="Distributed evolutionary search for small hybrid recurrent/attention "
                    "language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (data, runs, models, alignment, evaluation, serving, dashboard):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - only bad input is caught; a bug is re-raised
        message = _user_message(err)
        if message is None or os.environ.get("CHIMERA_DEBUG"):
            raise
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
        return EXIT_USAGE


def _user_message(err: Exception) -> str | None:
    """The one line to print for bad input (a flag, a file, a URL) or a file-system refusal;
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(err, user_errors()):
        return str(err)
    if isinstance(err, OSError) and err.strerror:  # permissions, a full disk, a missing path
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return None


if __name__ == "__main__":
    sys.exit(main())
