"""The checks in front of every route of ``chimera serve`` and ``chimera dashboard``, the JSON
errors they answer, the pages' static files, and ``LocalServer``, which binds a socket and runs
an app behind these checks with uvicorn (in the foreground, or in a thread).

Every error, uvicorn's own for a malformed request included, is JSON in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (``error_response``), with a 4xx status
(503 when busy) and a message naming the header or limit at fault: a body over the size limit
413, not JSON 415, a wrong Host 421, another site's Origin 403, an unknown path 404, a method
other than GET, HEAD or POST 405 (so a CORS preflight is refused), a body with neither
Content-Length nor chunks 411, one that stalls for IO_TIMEOUT (30 s) 408 (a chunked body is
read up to the same size limit); a connection that takes IO_TIMEOUT to send its request's
headers is dropped. A bug is a 500 and one line in the log, never a traceback.

Only the page's own requests are served: a POST must be ``application/json`` (415 otherwise; a
cross-site HTML form cannot send that, and a cross-site script that tries needs a CORS
preflight, which is refused); a request whose ``Origin`` is not the server's own is refused
(403: it must be ``http://`` and the Host asked for); and the ``Host`` header must name this
server (421), which stops DNS rebinding. Accepted hosts are 127.0.0.1, localhost and [::1] plus
the address it was bound to, each with the port (bare on port 80). Bound to every interface
(0.0.0.0 or ::) the server cannot know the names it is reached by and accepts any Host: the
Origin check still stops cross-site use, but not DNS rebinding, a risk that choice takes on
along with exposing the server to the network. Nothing asks for a key: anyone who can reach the
port can use what it serves.

Pages (``static_files``) are served with a Content-Security-Policy that allows only their own
script.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from cluster.serve.service import ApiError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
EVERY_INTERFACE = ("", "0.0.0.0", "::")
# Seconds a connection may stall: for a request to begin (its headers), for its body to arrive
# (408), for a piece of a stream to be taken (a client that stops reading). So a client that
# sends half a request, or reads nothing, cannot hold a connection forever. (Generating is not
# I/O: a slow model is not cut short by it.)
IO_TIMEOUT = 30.0
# Seconds a stopping server waits for replies still streaming before it cancels them.
SHUTDOWN_GRACE = 5
ALLOWED_METHODS = ("GET", "HEAD", "POST")
# When its grace has run out, a stopping uvicorn cancels the requests still running, and logs
# the traceback of any that ends with the CancelledError. Those requests are answered instead:
# the reply is stopped (a cancelled request stops its generation) and this error said.
STOPPING = ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping")


def internal_error(scope, err: Exception) -> ApiError:
    """An unexpected exception (a bug): one line in the log, and the 500 to answer."""
    sys.stderr.write(f"wyrd: {scope['method']} {scope['path']:.100}: internal error: "
                     f"{type(err).__name__}: {err}\n")
    return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(err).__name__})")


def error_body(err: ApiError) -> dict:
    kind = "server_error" if err.status >= 500 else "invalid_request_error"
    return {"error": {"message": str(err), "type": kind, "param": err.param, "code": err.code}}


def error_response(err: ApiError, close: bool = False) -> JSONResponse:
    """``err`` as OpenAI's error object; ``close`` ends the connection after it (the request's
    body may be unread)."""
    headers = {"Connection": "close"} if close else {}
    if err.status == HTTPStatus.METHOD_NOT_ALLOWED:
        headers["Allow"] = ", ".join(ALLOWED_METHODS)
    if err.status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers["Retry-After"] = "1"  # a reply takes seconds; clients such as openai wait this
    return JSONResponse(error_body(err),
                        status_code=err.status, headers=headers)


class _ClientLeft(Exception):
    """The client disconnected while its request body was being read: nobody to answer."""


class Guard:
    """ASGI middleware in front of every route: the Host and Origin checks, the methods, the
    JSON-only POST body (read here, within its size and time limits, then handed on), errors as
    JSON, and the last line of defence (an unexpected exception is one line in the log and a
    500, not a traceback)."""

    def __init__(self, app, hosts: frozenset[str] | None, origin: str, max_body: int) -> None:
        self.app, self.hosts, self.origin, self.max_body = app, hosts, origin, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, unread = False, scope["method"] == "POST"

        async def guarded_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-content-type-options", b"nosniff")]}
            await send(message)

        try:
            headers = Headers(scope=scope)
            self._check_origin(headers, scope["method"])
            if scope["method"] == "POST":
                receive = await self._read_body(headers, receive)
                unread = False
            await self.app(scope, receive, guarded_send)
        except ApiError as err:
            if not started:  # an unread body would be taken for the next request: close
                await error_response(err, close=unread)(scope, receive, guarded_send)
        except _ClientLeft:
            pass
        except asyncio.CancelledError:  # uvicorn stopping: see STOPPING
            if not started:
                await error_response(STOPPING, close=True)(scope, receive, guarded_send)
        except Exception as err:  # noqa: BLE001 - the last line of defence, logged
            failure = internal_error(scope, err)
            if not started:
                await error_response(failure, close=True)(scope, receive, guarded_send)

    def _check_origin(self, headers: Headers, method: str) -> None:
        """The Host must name this server and an Origin, when sent, must be its own."""
        hosts = headers.getlist("host")
        if len(hosts) != 1:  # (h11 itself refuses HTTP/1.1 without one)
            raise ApiError(HTTPStatus.BAD_REQUEST, "the Host header is missing" if not hosts
                           else "more than one Host header")
        host = hosts[0].strip().lower()
        if self.hosts is not None and host not in self.hosts:
            raise ApiError(HTTPStatus.MISDIRECTED_REQUEST,
                           f"Host {host!r:.80} is not this server; use {self.origin}/")
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower() != f"http://{host}":
            raise ApiError(HTTPStatus.FORBIDDEN,
                           f"Origin {origin!r:.80} is not this server's; requests from "
                           f"other sites are refused")
        if method not in ALLOWED_METHODS:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED,
                           f"method {method:.20} is not allowed; use GET or POST")

    async def _read_body(self, headers: Headers, receive):
        """The whole body, checked, and a ``receive`` that hands it on to the app."""
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type.lower() != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type must be application/json, not "
                           f"{content_type or 'missing'!r:.60}")
        # h11 has checked that Content-Length is digits and that it is alone or chunked.
        length = headers.get("content-length")
        if length is None and "transfer-encoding" not in headers:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if length is not None and (len(length) > 15 or int(length) > self.max_body):
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length:.20} bytes (Content-Length): at most "
                           f"{self.max_body}")
        try:
            body = await asyncio.wait_for(self._receive_body(receive), IO_TIMEOUT)
        except asyncio.TimeoutError:  # (the builtin TimeoutError from Python 3.11)
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                                                       f"{IO_TIMEOUT:g} s") from None
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()  # after the body: a disconnect, when it comes
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    async def _receive_body(self, receive) -> bytes:
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:  # a chunked body has no length to check beforehand
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body of more than {self.max_body} bytes: at most "
                               f"{self.max_body}")
        return bytes(body)


class _JsonH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1, answering a request that h11 refuses as malformed (a bad request
    line, Content-Length or Host, before any app sees it) with a JSON error that says what h11
    found, like every other error, instead of uvicorn's plain-text "Invalid HTTP request"."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._refusal = "malformed"
        parse = self.conn.next_event

        def next_event():  # h11's reason is dropped by uvicorn: keep it for the answer
            try:
                return parse()
            except h11.RemoteProtocolError as err:
                self._refusal = str(err)
                raise

        self.conn.next_event = next_event

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request()

    def _expect_request(self) -> None:
        """Drop the connection unless a request has begun (its headers complete) within
        IO_TIMEOUT: uvicorn's own keep-alive timeout restarts with every byte, so a client
        that sends its headers a byte at a time would hold the connection for ever."""
        before = self.cycle

        def drop() -> None:  # (a pipelined request may already be running: it is not idle)
            idle = before is None or before.response_complete
            if self.cycle is before and idle and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(IO_TIMEOUT, drop)

    def send_400_response(self, msg: str) -> None:
        refusal = ApiError(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {self._refusal:.120}")
        body = json.dumps(error_body(refusal))
        response = h11.Response(status_code=400, reason=b"Bad Request",
                                headers=[(b"content-type", b"application/json"),
                                         (b"connection", b"close"),
                                         (b"x-content-type-options", b"nosniff")])
        for event in (response, h11.Data(data=body.encode()), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def static_files(folder: str, files: dict[str, tuple[str, str]]):
    """An endpoint for ``files`` (URL path -> (file name, content type)) in ``folder`` of this
    package, with the Content-Security-Policy that allows only the page's own script."""

    async def page(request: Request) -> Response:
        name, content_type = files[request.url.path]
        body = resources.files("cluster.serve").joinpath(folder, name).read_bytes()
        return Response(body, media_type=content_type,
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    return page


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405, as JSON."""
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        message = (f"method {request.method} is not allowed on {request.url.path:.100}; "
                   f"use {(exc.headers or {}).get('Allow', 'another')}")
    elif exc.status_code == HTTPStatus.NOT_FOUND:
        message = f"no such path: {request.url.path:.100}"
    else:
        message = exc.detail
    return JSONResponse(error_body(ApiError(exc.status_code, message)),
                        status_code=exc.status_code, headers=exc.headers)


def guarded_app(routes: list[Route], hosts: frozenset[str] | None, origin: str,
                max_body: int) -> Starlette:
    """``routes`` behind the ``Guard`` (see the module docstring), every error as JSON."""
    guard = Middleware(Guard, hosts=hosts, origin=origin, max_body=max_body)
    return Starlette(routes=routes, middleware=[guard],
                     exception_handlers={HTTPException: _http_error})


class LocalServer:
    """An app made by ``make_app(allowed_hosts, own_origin)``, bound to its address (port 0
    picks a free one) but not yet serving: ``serve_forever()`` in the foreground (the CLI;
    Ctrl+C stops it), or ``start()`` and ``stop()`` (or ``with``) in a background thread
    (tests). ``name`` names that thread."""

    def __init__(self, make_app: Callable[[frozenset[str] | None, str], Starlette],
                 host: str = "127.0.0.1", port: int = 8000, name: str = "wyrd-server") -> None:
        self.bound_host, self.name = host, name
        # Bound here rather than by uvicorn: a port that is taken fails now, as an OSError, and
        # port 0's pick is known before the app (whose Host check needs it) is built.
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # A reply goes out in small writes (its head, then its body): without this, Nagle's
            # algorithm holds the second back until the client's delayed ACK, ~40 ms a request
            # on a kept-alive connection. (Accepted connections inherit it from this socket.)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        port = self.server_address[1]
        if host in EVERY_INTERFACE:
            self.allowed_hosts = None  # any: see the module docstring
        else:
            names = {*LOOPBACK_HOSTS, f"[{host}]" if ":" in host else host.lower()}
            self.allowed_hosts = frozenset({f"{name}:{port}" for name in names}
                                           | (names if port == 80 else set()))
        self.app = make_app(self.allowed_hosts, self.own_origin())
        # log_config=None: uvicorn leaves logging alone; only its errors reach stderr.
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, http=_JsonH11Protocol, ws="none", lifespan="off", log_config=None,
            log_level="error", access_log=False, server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE))
        self._thread: threading.Thread | None = None

    def allows_host(self, host: str) -> bool:
        return self.allowed_hosts is None or host in self.allowed_hosts

    def own_origin(self) -> str:
        host = self.bound_host if self.bound_host not in EVERY_INTERFACE else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server_address[1]}"

    def serve_forever(self) -> None:
        """Serve until stopped; in the main thread, Ctrl+C stops it (after up to
        SHUTDOWN_GRACE s for replies still streaming) and is then raised as KeyboardInterrupt."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self.server_close()

    def start(self, timeout: float = 30.0) -> LocalServer:
        """Serve in a background thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.server_close()

    def server_close(self) -> None:
        self.socket.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
