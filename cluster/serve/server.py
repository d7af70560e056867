"""``chimera serve``: Wyrd, a web chat page for a model directory, and the HTTP API behind it.

Standard library HTTP (a thread per connection), no framework: one page, three endpoints.

    GET  /             the chat page (Wyrd)
    GET  /api/info     the model, its context, the limits and the default sampling
    POST /api/chat     {"messages": [{"role", "content"}...], "temperature", "top_p",
                        "max_tokens", "seed", "stream": true}   (Content-Type: application/json)
                       streaming: Server-Sent Events, one ``data: {"delta": "..."}`` per piece
                       of text, then ``data: {"done": true, "trimmed": N, "pieces": P,
                       "finish_reason": R}``; otherwise one JSON object ``{"reply", "trimmed",
                       "pieces", "finish_reason"}``. R is "stop" (the model ended its turn) or
                       "length" (it used its budget: max_tokens, or the rest of the context).

The server keeps no conversations: each client sends its whole history, so concurrent users
never see each other's, and the history is trimmed from the oldest turn to leave room for
``max_tokens`` (``trimmed`` says how many messages were left out). Any ``max_tokens`` up to the
advertised limit is accepted even when it is as large as the context: the newest message is
then kept alone and the reply stops where the context ends (see ``chimera.chat.fit_prompt``).
Message content is data: text that spells a chat marker is encoded as plain characters, so no
one can forge another role's turn.

Every error is a 4xx (503 when busy) with ``{"error": "..."}`` naming the field or header at
fault, and so are http.server's own (a malformed request line, say); a bug would be a 500 and
one line in the log, never a dropped connection or a traceback. Sampling values are checked by
``SamplingConfig``; the server adds JSON types (a bool is not a number, ``stream`` must be a
boolean, unknown fields are named rather than ignored) and its own limits. A client that
disconnects stops its generation at the next piece, streaming or not (a non-streaming client is
watched for a closed socket between pieces), so it frees its place among the
``max_concurrent``. A connection that stalls for 30 s is answered 408 or dropped.

Only the page's own requests are served: a POST must be ``application/json`` (415 otherwise; a
cross-site HTML form cannot send that, and a cross-site script that tries needs a CORS
preflight, which is refused); a request whose ``Origin`` is not the server's own is refused
(403: it must be ``http://`` and the Host asked for); and the ``Host`` header must name this
server (421), which stops DNS rebinding. Accepted hosts are 127.0.0.1, localhost and [::1] plus
the address it was bound to, each with the port (bare on port 80). Bound to every interface
(0.0.0.0 or ::) the server cannot know the names it is reached by and accepts any Host: the
Origin check still stops cross-site use, but not DNS rebinding, a risk that choice takes on
along with exposing the model to the network.

The page inserts all text with ``textContent`` (never as HTML) and is served with a
Content-Security-Policy that allows only its own script.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from chimera.chat import Reply
from cluster.serve.service import ApiError, ChatService

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
EVERY_INTERFACE = ("", "0.0.0.0", "::")
# Seconds a connection may stall while we read its request or write to it: a client that
# sends half a request (or stops reading a stream) cannot hold a thread forever. Generating a
# reply is not I/O, so a slow model is not cut short by it.
IO_TIMEOUT = 30.0


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # json.loads would accept NaN, Infinity


def _decode_json(raw: bytes):
    try:
        return json.loads(raw or b"null", parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON: nested too "
                                               "deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"the body is not valid JSON: {str(err):.100}") from None


class WyrdHandler(BaseHTTPRequestHandler):
    """One connection's requests; the service is the server's (``WyrdServer.service``)."""

    protocol_version = "HTTP/1.1"
    server_version = "Wyrd"
    timeout = IO_TIMEOUT

    def log_message(self, format, *args):  # quiet; the CLI prints the address
        pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: dict, extra: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", extra)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (malformed request line, headers too long, unknown
        method...) as JSON like all the others, and the connection closed."""
        self.close_connection = True
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self._json(status, {"error": message or status.phrase})

    def _guarded(self, handle) -> None:
        """Run one request's handler: errors become their JSON answer, a client that left
        ends the request quietly, and anything unexpected is one line in the log and a 500
        (never a dropped connection with a traceback)."""
        self._body_read = self._answered = False
        try:
            handle()
        except ApiError as err:
            if not self._body_read:  # an unread body would be taken for the next request
                self.close_connection = True
            self._answer_error(err.status, str(err))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client left or stalled: nobody to answer
        except Exception as err:  # noqa: BLE001 - the last line of defence, logged
            sys.stderr.write(f"wyrd: {self.command} {self.path:.100}: internal error: "
                             f"{type(err).__name__}: {err}\n")
            self.close_connection = True
            self._answer_error(HTTPStatus.INTERNAL_SERVER_ERROR,
                               f"internal error ({type(err).__name__})")

    def _answer_error(self, status: HTTPStatus, message: str) -> None:
        if self._answered:
            return  # a stream already began: the closed connection says it ended badly
        try:
            self._json(status, {"error": message})
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _check_origin(self) -> None:
        """The Host must name this server and an Origin, when sent, must be its own."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           "the Host header is missing" if not hosts else
                           "more than one Host header")
        host = hosts[0].strip().lower()
        if not self.server.allows_host(host):
            raise ApiError(HTTPStatus.MISDIRECTED_REQUEST,
                           f"Host {host!r:.80} is not this server; use "
                           f"{self.server.own_origin()}/")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{host}":
            raise ApiError(HTTPStatus.FORBIDDEN,
                           f"Origin {origin!r:.80} is not this server's; requests from "
                           f"other sites are refused")

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def _get(self) -> None:
        self._check_origin()
        if self.path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.service.info())
        if self.path in WEB_FILES:
            name, content_type = WEB_FILES[self.path]
            body = resources.files("cluster.serve").joinpath("web", name).read_bytes()
            return self._send(HTTPStatus.OK, body, content_type,
                              {"Content-Security-Policy": CSP, "Cache-Control": "no-store"})
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {self.path:.100}")

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._json(HTTPStatus.METHOD_NOT_ALLOWED,
                   {"error": f"method {self.command} is not allowed; use GET or POST"},
                   {"Allow": "GET, HEAD, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding is not "
                           "supported; send the body with a Content-Length header")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if len(set(lengths)) > 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
        text = lengths[0].strip()
        if not re.fullmatch(r"[0-9]+", text):  # not -1 (read to EOF), not "abc"
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"Content-Length {text!r:.40} is not a number of bytes")
        if len(text) > 15 or int(text) > self.server.service.limits.max_body_bytes:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {text:.20} bytes (Content-Length): at most "
                           f"{self.server.service.limits.max_body_bytes}")
        length = int(text)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                                                       f"{IO_TIMEOUT:g} s") from None
        self._body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(raw)} of "
                                                   f"its {length} bytes (Content-Length)")
        return raw

    def _post(self) -> None:
        self._check_origin()
        if self.path != "/api/chat":
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path:.100}")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type.lower() != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type must be application/json, not "
                           f"{content_type or 'missing'!r:.60}")
        body = _decode_json(self._read_body())
        messages, sampling, streaming = self.server.service.parse(body)
        reply = self.server.service.prepare(messages, sampling)
        pieces = self.server.service.pieces(reply)
        if streaming:
            return self._stream(pieces, reply)
        text = []
        try:
            for piece in pieces:
                text.append(piece)
                if self._client_gone():  # nobody would read the reply: stop generating
                    self.close_connection = True
                    return
        finally:
            pieces.close()
        self._json(HTTPStatus.OK, {"reply": "".join(text), "trimmed": reply.trimmed,
                                   "pieces": len(text),
                                   "finish_reason": reply.finish_reason})

    def _client_gone(self) -> bool:
        """Whether the client has closed its end: its socket reads as at end of file. (A
        client that only half-closes, shutting down its sending side while it waits, looks
        the same; HTTP clients do not do that.) Pipelined bytes of a next request are data,
        so they do not count."""
        sock = self.connection
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if not poller.poll(0):
                    return False
            elif not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True

    def _stream(self, pieces, reply: Reply) -> None:
        try:
            first = next(pieces, None)  # a busy server answers 503 before any byte is sent
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.send_header("Connection", "close")
            self.close_connection = True  # the stream ends with the connection
            self.end_headers()
            self._answered = True
            sent = 0
            if first is not None:
                self._event({"delta": first})
                sent += 1
            for piece in pieces:
                if self._client_gone():
                    return
                self._event({"delta": piece})
                sent += 1
            self._event({"done": True, "trimmed": reply.trimmed, "pieces": sent,
                         "finish_reason": reply.finish_reason})
        except (ConnectionError, TimeoutError):
            pass  # the client left (or stopped reading): stop generating
        finally:
            pieces.close()

    def _event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


class WyrdServer(ThreadingHTTPServer):
    """The HTTP server, knowing the Host names it answers to."""

    daemon_threads = True

    def __init__(self, host: str, port: int, service: ChatService) -> None:
        # An IPv6 literal needs an IPv6 socket (http.server's default is IPv4 only).
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), WyrdHandler)
        self.service = service
        self.bound_host = host
        port = self.server_address[1]
        if host in EVERY_INTERFACE:
            self.allowed_hosts = None  # any: see the module docstring
        else:
            names = {*LOOPBACK_HOSTS, f"[{host}]" if ":" in host else host.lower()}
            self.allowed_hosts = frozenset({f"{name}:{port}" for name in names}
                                           | (names if port == 80 else set()))

    def allows_host(self, host: str) -> bool:
        return self.allowed_hosts is None or host in self.allowed_hosts

    def own_origin(self) -> str:
        host = self.bound_host if self.bound_host not in EVERY_INTERFACE else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        """A connection that failed outside a request's handler (reset while its request line
        was read, say): one line in the log, not a traceback."""
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            return  # the client went away: nothing to report
        sys.stderr.write(f"wyrd: connection from {client_address[0]}: "
                         f"{type(err).__name__}: {err}\n")


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000
                ) -> WyrdServer:
    """The HTTP server (not yet serving); port 0 picks a free port."""
    return WyrdServer(host, port, service)
