"""``chimera serve``: Wyrd, a web chat page for a model directory, and the HTTP API behind it.

Standard library HTTP (a thread per connection), no framework: one page, three endpoints.

    GET  /             the chat page (Wyrd)
    GET  /api/info     the model, its context, the limits and the default sampling
    POST /api/chat     {"messages": [{"role", "content"}...], "temperature", "top_p",
                        "max_tokens", "seed", "stream": true}
                       streaming: Server-Sent Events, one ``data: {"delta": "..."}`` per piece
                       of text, then ``data: {"done": true, "trimmed": N, "pieces": P}``;
                       otherwise one JSON object ``{"reply", "trimmed", "pieces"}``.

The server keeps no conversations: each client sends its whole history, so concurrent users
never see each other's, and the history is trimmed from the oldest turn to fit the context
(``trimmed`` says how many messages were left out). Requests over the limits get a 4xx with
``{"error": "..."}``. A client that disconnects mid-stream stops its generation at the next
token. The page inserts all text with ``textContent`` (never as HTML) and is served with a
Content-Security-Policy that allows only its own script.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from chimera.chat import ConversationError, check_messages, prompt_ids, reply_stream
from chimera.generation import SamplingConfig
from chimera.model import Chimera, param_counts_analytic

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:")


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 4000
    max_messages: int = 64
    max_new_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_concurrent: int = 8  # generations at once; more get 503


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChatService:
    """Validates requests and streams replies; shared by every connection's thread."""

    def __init__(self, model: Chimera, tokenizer, name: str, limits: Limits = Limits(),
                 defaults: SamplingConfig = SamplingConfig(max_new_tokens=200, temperature=0.8,
                                                           top_p=0.95)) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.limits = limits
        self.defaults = dataclasses.replace(
            defaults, max_new_tokens=min(defaults.max_new_tokens, limits.max_new_tokens))
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.lock = threading.Lock()
        self.active = 0  # generations running now
        self.pieces_generated = 0  # text pieces (about a token each) over the server's life

    def info(self) -> dict:
        return {"model": self.name, "params": param_counts_analytic(self.model.config).total,
                "context": self.model.config.max_seq_len, "limits": asdict(self.limits),
                "defaults": {"temperature": self.defaults.temperature,
                             "top_p": self.defaults.top_p,
                             "max_tokens": self.defaults.max_new_tokens}}

    def parse(self, body: dict) -> tuple[list[dict], SamplingConfig, bool]:
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        messages = body.get("messages")
        try:
            check_messages(messages or [])
        except ConversationError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages: {err}") from None
        if len(messages) > self.limits.max_messages:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{len(messages)} messages: at most {self.limits.max_messages}; "
                           f"start a new chat")
        for i, message in enumerate(messages):
            if len(message["content"]) > self.limits.max_message_chars:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"message {i} has {len(message['content'])} characters: at "
                               f"most {self.limits.max_message_chars}")
        if messages[-1]["role"] != "user":
            raise ApiError(HTTPStatus.BAD_REQUEST, "the last message must be the user's")
        max_tokens = body.get("max_tokens", self.defaults.max_new_tokens)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.limits.max_new_tokens:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"max_tokens must be an integer in [1, {self.limits.max_new_tokens}]")
        try:
            temperature = float(body.get("temperature", self.defaults.temperature))
            top_p = float(body.get("top_p", self.defaults.top_p))
            if not 0 <= temperature <= 2:
                raise ValueError(f"temperature={temperature}: must be in [0, 2]")
            seed = body.get("seed")
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, seed=None if seed is None else int(seed))
        except (TypeError, ValueError) as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return messages, sampling, bool(body.get("stream", False))

    def trimmed(self, messages: list[dict], sampling: SamplingConfig) -> int:
        room = self.model.config.max_seq_len - sampling.max_new_tokens
        try:
            return prompt_ids(self.tokenizer, messages, room)[1]
        except ConversationError as err:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(err)) from None

    def pieces(self, messages: list[dict], sampling: SamplingConfig):
        """The reply's text pieces; counts the generation as active while it runs."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again")
        with self.lock:
            self.active += 1
        try:
            for piece in reply_stream(self.model, self.tokenizer, messages, sampling):
                with self.lock:
                    self.pieces_generated += 1
                yield piece
        finally:
            with self.lock:
                self.active -= 1
            self.slots.release()


def _handler(service: ChatService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "Wyrd"

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
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path == "/api/info":
                return self._json(HTTPStatus.OK, service.info())
            if self.path in WEB_FILES:
                name, content_type = WEB_FILES[self.path]
                body = resources.files("cluster").joinpath("web", name).read_bytes()
                return self._send(HTTPStatus.OK, body, content_type,
                                  {"Content-Security-Policy": CSP, "Cache-Control": "no-store"})
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/api/chat":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: "
                                                                  f"{self.path}"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > service.limits.max_body_bytes:
                    self.close_connection = True
                    raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"body of {length} bytes: at most "
                                   f"{service.limits.max_body_bytes}")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
                messages, sampling, streaming = service.parse(body)
                trimmed = service.trimmed(messages, sampling)
                pieces = service.pieces(messages, sampling)
                if streaming:
                    return self._stream(pieces, trimmed)
                text = list(pieces)
                self._json(HTTPStatus.OK, {"reply": "".join(text), "trimmed": trimmed,
                                           "pieces": len(text)})
            except ApiError as err:
                self._json(err.status, {"error": str(err)})

        def _stream(self, pieces, trimmed: int) -> None:
            first = next(pieces, None)  # a busy server answers 503 before any byte is sent
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.close_connection = True  # the stream ends with the connection
            self.end_headers()
            sent = 0
            try:
                for piece in itertools.chain([] if first is None else [first], pieces):
                    self._event({"delta": piece})
                    sent += 1
                self._event({"done": True, "trimmed": trimmed, "pieces": sent})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left: stop generating
            finally:
                pieces.close()

        def _event(self, data: dict) -> None:
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000
                ) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving); port 0 picks a free port."""
    server = ThreadingHTTPServer((host, port), _handler(service))
    server.daemon_threads = True
    return server
