"""What a command that serves a page does around its server: bind (a taken port is one line,
exit status 2), say where it listens, warn when that is beyond this machine, serve until
Ctrl+C. (``chimera serve`` and ``chimera dashboard`` use it.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Console

from cluster.cli.errors import CommandError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind(make_server: Callable, host: str, port: int):
    """``make_server(host, port)``, a port that cannot be had as a ``CommandError``."""
    try:
        return make_server(host, port)
    except OSError as err:
        raise CommandError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(server, console: Console, banner: str, exposed: str, notes: Sequence[str] = ()
          ) -> int:
    """Print ``banner`` (with the address appended), then ``notes`` (a line each) and, bound
    beyond loopback, ``exposed``; serve until Ctrl+C. The server closes itself however it
    ends."""
    console.print(f"{banner} on {server.own_origin()}/ (Ctrl+C stops)", highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    if server.bound_host not in LOCAL_HOSTS:
        console.print(f"[yellow]listening beyond this machine: {exposed}[/yellow]")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    return 0
