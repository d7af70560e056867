"""The ``chimera`` command line: ``main`` is the console script (also ``python -m cluster.cli``).

    main.py      the parser (each group of commands registers its own) and the one error path
    argtypes.py  argument types: a bad number is refused by argparse, naming its flag
    errors.py    which exceptions mean bad input (one line, exit status 2)
    data.py      chimera model ..., chimera data ...
    runs.py      chimera evolve, leaderboard, export, plot
    models.py    chimera promote, train, sft, generate, chat
    serving.py   chimera serve
    dashboard.py chimera dashboard
    listening.py around a server: bind, say where, warn beyond loopback, serve until Ctrl+C
"""

from cluster.cli.main import main

__all__ = ["main"]
