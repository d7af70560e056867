"""``chimera dashboard RUN``: a live page of a search run in the browser (127.0.0.1 unless told
otherwise), read-only, while the search runs or after."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from cluster.app.evolve import load_settings
from cluster.app.promote.settings import PromoteSettings
from cluster.cli import argtypes, listening
from cluster.cli.errors import CommandError
from cluster.serve.dashboard import make_dashboard_server
from cluster.serve.run_view import RunView
from results.db import RunDatabase


def open_view(run: str) -> RunView:
    """The dashboard's view of the run directory ``run``: its database opened read-only."""
    if not Path(run).is_dir():
        raise CommandError(f"{run}: not a run directory (chimera evolve --run-dir makes one)")
    try:  # (a damaged run.json or database: RunDirError, RunDatabaseError, one line too)
        db = RunDatabase(load_settings(run).database_target, readonly=True)
    except FileNotFoundError as err:  # no run.json, or no database: the message names it
        raise CommandError(str(err)) from None
    promoted = PromoteSettings(run_dir=run).out_dir  # where chimera promote RUN puts it
    return RunView(db, Path(run).resolve().name, promoted, f"chimera serve {promoted}")


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    view = open_view(args.run)
    try:
        server = listening.bind(lambda host, port: make_dashboard_server(view, host, port),
                                args.host, args.port)
    except CommandError:
        view.close()
        raise
    return listening.serve(server, console, f"[bold]chimera dashboard[/bold] of {args.run}",
                           "anyone who can reach it can see the run")


def register(commands) -> None:
    """Add ``chimera dashboard`` to the main parser."""
    dashboard = commands.add_parser(
        "dashboard", help="a live page of a search run in the browser",
        description="Serve a live page of a run: its leaderboard, best-so-far curve, Pareto "
                    "front, candidates, lineage, workers and promoted report, and the JSON "
                    "behind it (see README: Dashboard). Reads the run without disturbing its "
                    "search. Binds to 127.0.0.1 unless told otherwise.")
    dashboard.add_argument("run", metavar="RUN", help="a run directory (chimera evolve "
                                                      "--run-dir)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="the address to listen on; requests must name it (or "
                                "localhost) as their Host")
    dashboard.add_argument("--port", type=argtypes.port, default=8001, help="0 picks a free port")
    dashboard.set_defaults(handler=cmd_dashboard)
