"""The ``chimera`` command line. Argument parsing lives here and only here: each subcommand turns
its arguments into configs at once and calls library functions.

Expected failures (bad input) print one clear line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from chimera.config import PRESETS, ChimeraConfig, get_preset

EXIT_USAGE = 2


class CommandError(Exception):
    """A user error with a message fit to print as is."""


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _resolve_config(args: argparse.Namespace) -> ChimeraConfig:
    if args.config:
        from chimera.checkpoint import CheckpointError, load_config

        try:
            return load_config(args.config)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
    try:
        return get_preset(args.preset)
    except ValueError as err:
        raise CommandError(str(err)) from None


def cmd_model_info(args: argparse.Namespace, console: Console) -> int:
    from chimera.model import param_counts_of

    config = _resolve_config(args)
    counts = param_counts_of(config)
    table = Table(title=f"Chimera {args.preset or args.config}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("summary", config.summary())
    table.add_row("layer pattern", f"{config.pattern}  ({config.pattern.count('R')} recurrent, "
                                   f"{config.pattern.count('A')} attention)")
    table.add_row("parameters", f"{_format_count(counts.total)} ({counts.total:,})")
    table.add_row("  embedding", f"{_format_count(counts.embedding)} ({counts.embedding:,})")
    table.add_row("  non-embedding",
                  f"{_format_count(counts.non_embedding)} ({counts.non_embedding:,})")
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


def cmd_model_presets(args: argparse.Namespace, console: Console) -> int:
    from chimera.model import param_counts_of

    table = Table(title="Chimera presets")
    for column in ("preset", "summary", "pattern", "params", "non-embedding"):
        table.add_column(column)
    for name, config in PRESETS.items():
        counts = param_counts_of(config)
        table.add_row(name, config.summary(), config.pattern, _format_count(counts.total),
                      _format_count(counts.non_embedding))
    console.print(table)
    return 0


def cmd_evolve(args: argparse.Namespace, console: Console) -> int:
    # Placeholder until the `chimera evolve` issue lands: show what the search would start from.
    console.print("[bold]chimera evolve[/bold]: the evolutionary search is not built yet "
                  "(see the `chimera evolve` issue). It will start from these presets:")
    return cmd_model_presets(args, console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera",
        description="Distributed evolutionary search for small hybrid recurrent/attention "
                    "language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = commands.add_parser("model", help="inspect model configurations")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = model_commands.add_parser("info", help="layer pattern and parameter counts")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in preset")
    source.add_argument("--config", metavar="MODEL_DIR", help="a saved model directory")
    info.set_defaults(handler=cmd_model_info)
    presets = model_commands.add_parser("presets", help="list the built-in presets")
    presets.set_defaults(handler=cmd_model_presets)

    evolve = commands.add_parser("evolve", help="run an evolutionary architecture search")
    evolve.set_defaults(handler=cmd_evolve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except CommandError as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
