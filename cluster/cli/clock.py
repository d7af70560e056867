"""How long the ``chimera`` command has run: a ``--budget`` is the command's wall clock, and
its start-up (importing torch, Ray and the rest takes ~6 s) is part of it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def seconds_since_launch() -> float:
    """Seconds since this process started, when it is the ``chimera`` command (the console
    script, or ``python -m cluster.cli``); 0 inside another program (a test calling ``main``),
    whose start has nothing to do with the command's budget."""
    module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if Path(sys.argv[0]).name != "chimera" and module != "cluster.cli.__main__":
        return 0.0  # e.g. `python -m pytest`, whose argv[0] is also a __main__.py
    try:  # Linux: the process's start in clock ticks after boot, against the uptime
        started = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0  # elsewhere: the budget counts from the command's first step
