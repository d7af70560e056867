"""``chimera serve``: the chat page (Wyrd) and an OpenAI-compatible API, on Starlette and uvicorn.

    service.py   ChatService: requests validated, histories fitted, replies generated (and cut
                 at stop strings); no HTTP, no event loop
    guard.py     what every app here stands behind: the checks (Host, Origin, JSON only, size
                 and time limits), errors as JSON, static files, and LocalServer (a bound
                 socket, uvicorn in the foreground or a thread)
    server.py    the chat app and its server (WyrdServer): the page, /v1/chat/completions,
                 /v1/models, generation in worker threads
    web/         the page
    run_view.py  RunView: what ``chimera dashboard`` shows of a search run, as JSON; no HTTP
    dashboard.py its app and server, behind guard.py's checks; dashboard_web/ its page
"""

from cluster.serve.server import WyrdServer, build_app, make_server
from cluster.serve.service import ApiError, ChatService, Limits

__all__ = ["ApiError", "ChatService", "Limits", "WyrdServer", "build_app", "make_server"]
