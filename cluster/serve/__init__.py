"""``chimera serve``: the chat page (Wyrd) and its HTTP API, on the standard library.

    service.py   ChatService: requests validated, histories fitted, replies generated
    server.py    the HTTP server and handler: the page, the API, its checks (Host, Origin, JSON)
    web/         the page
"""

from cluster.serve.server import WyrdServer, make_server
from cluster.serve.service import ApiError, ChatService, Limits

__all__ = ["ApiError", "ChatService", "Limits", "WyrdServer", "make_server"]
