"""``chimera dashboard RUN``: a live page of a search run, and the JSON it polls.

    GET /                         the page (``dashboard_web/``), /dashboard.js, /dashboard.css
    GET /api/run                  settings, counts by status, budget and elapsed time, the best
    GET /api/candidates           every candidate as a leaderboard row, and the best-so-far
                                  series ([results so far, worker-hours, FLOPs, bpb or null])
    GET /api/candidates/{id}      one candidate: genome, parents and what changed, rungs, loss
                                  curve, timings, worker, error (404 if none)
    GET /api/lineage/{id}         that candidate and its ancestors up to the roots
    GET /api/promoted             RUN/promoted's metrics.json and report.md (404 until
                                  ``chimera promote RUN`` made it)

The data is ``run_view.RunView``'s (read-only, never in the search's way). The app stands behind
the chat server's own checks and server (``guard.guarded_app``, ``guard.LocalServer``): the
Host must name this server (421), another site's Origin is refused (403), every error is JSON,
and the page is served with a Content-Security-Policy that allows only its own script. The
page draws its charts itself from the JSON and inserts all text with ``textContent``.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cluster.serve.guard import LocalServer, guarded_app, static_files
from cluster.serve.run_view import NotFound, RunView
from cluster.serve.service import ApiError
from results.db import RunDatabaseError

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
             "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
MAX_BODY = 1024  # nothing here takes a body; a POST is refused (405) once the Guard has read it


def build_dashboard_app(view: RunView, hosts: frozenset[str] | None, origin: str):
    """The ASGI app over ``view``; ``hosts`` and ``origin`` as for ``server.build_app``."""

    async def answer(read, *args) -> Response:
        # Reading the run is blocking database work: in a thread, so the event loop stays free
        # for other requests (the page asks for several at once).
        try:
            body = await run_in_threadpool(read, *args)
        except NotFound as err:
            raise ApiError(HTTPStatus.NOT_FOUND, str(err), code="not_found") from None
        except RunDatabaseError as err:  # the database went away or was damaged meanwhile
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None
        return Response(body, media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def run(request: Request) -> Response:
        return await answer(view.run)

    async def candidates(request: Request) -> Response:
        return await answer(view.candidates)

    async def candidate(request: Request) -> Response:
        return await answer(view.candidate, request.path_params["id"])

    async def lineage(request: Request) -> Response:
        return await answer(view.lineage, request.path_params["id"])

    async def promoted(request: Request) -> Response:
        return await answer(view.promoted)

    page = static_files("dashboard_web", WEB_FILES)
    routes = [*(Route(path, page) for path in WEB_FILES),
              Route("/api/run", run), Route("/api/candidates", candidates),
              Route("/api/candidates/{id:int}", candidate),
              Route("/api/lineage/{id:int}", lineage), Route("/api/promoted", promoted)]
    return guarded_app(routes, hosts, origin, MAX_BODY)


class DashboardServer(LocalServer):
    """``chimera dashboard``'s server; closing it closes the view's database."""

    def __init__(self, view: RunView, host: str = "127.0.0.1", port: int = 8001) -> None:
        self.view = view
        super().__init__(lambda hosts, origin: build_dashboard_app(view, hosts, origin),
                         host, port, name="chimera-dashboard")

    def server_close(self) -> None:
        super().server_close()
        self.view.close()


def make_dashboard_server(view: RunView, host: str = "127.0.0.1", port: int = 8001
                          ) -> DashboardServer:
    """The dashboard's server, bound but not yet serving; port 0 picks a free port."""
    return DashboardServer(view, host, port)
