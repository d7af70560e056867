"""``chimera serve``: Wyrd, a web chat page for a model directory, and an OpenAI-compatible API.

An ASGI app (Starlette) served by uvicorn; ``ChatService`` (``service.py``) is the engine.
Starlette rather than FastAPI: the service checks every request itself (so that each error
names its field, in OpenAI's shape), which leaves nothing for FastAPI's pydantic models to do
but answer some errors in a second, different shape.

    GET  /                      the chat page (Wyrd), and GET /app.js its script
    GET  /api/info              for the page: the model, its context, the limits, the defaults
    GET  /v1/models             {"object": "list", "data": [{"id", "object": "model",
                                "created", "owned_by": "chimera"}]}: the one model served; its
                                id is the model directory's name (``ChatService.name``)
    GET  /v1/models/{id}        that model, or 404
    POST /v1/chat/completions   OpenAI's chat completion (Content-Type: application/json)

A chat completion takes ``messages`` ([{"role": "system" | "user" | "assistant", "content"}];
"developer" is taken for "system", content may be a list of text parts; the last message must
be the user's), ``model`` (optional; when sent it must be the served id, else 404
``model_not_found``), ``temperature`` [0, 2], ``top_p`` (0, 1], ``max_tokens`` (or its newer
name ``max_completion_tokens``) up to the server's limit, ``stop`` (a string or up to 4),
``seed``, ``stream`` and ``stream_options`` ({"include_usage"}). A field sent as null takes its
default (``GET /api/info``'s defaults, not OpenAI's). The answer is a ``chat.completion`` (id,
object, created, model, choices[{index, message{role, content}, logprobs: null,
finish_reason}], usage{prompt_tokens, completion_tokens, total_tokens}); streamed, Server-Sent
Events of ``chat.completion.chunk``s: the role first, then one content delta per piece of text,
then an empty delta with the finish_reason (and, with ``include_usage``, a chunk with no
choices and the usage), then ``data: [DONE]``. finish_reason is "stop" (the model ended its
turn, or a stop string came: the text ends before it) or "length" (max_tokens ran out, or the
rest of the context). One extension: ``trimmed``, in the answer and in the finish_reason chunk,
says how many of the oldest messages were left out to fit the context.

Other OpenAI fields: ``user``, ``metadata``, ``store``, ``service_tier``, ``safety_identifier``,
the ``prompt_cache_*`` ones and ``parallel_tool_calls`` are ignored (they change nothing here;
nothing is stored). Features this server lacks (``n`` > 1, ``tools``, ``functions``,
``logprobs``, penalties, ``logit_bias``, ``response_format`` other than text, audio, ...) are
accepted only when they ask for nothing (null or the API's default) and refused otherwise with a
400 naming the field (code ``unsupported_parameter``); any other field is a 400 too
(``unknown_parameter``): a typo is named, not ignored.

The server keeps no conversations: each client sends its whole history, so concurrent users
never see each other's, and the history is trimmed from the oldest turn to leave room for
``max_tokens``. Any ``max_tokens`` up to the advertised limit is accepted even when it is as large
as the context: the newest message is then kept alone and the reply stops where the context ends
(see ``chimera.chat.fit_prompt``). Message content is data: text that spells a chat marker is
encoded as plain characters, so no one can forge another role's turn.

Every error is JSON in OpenAI's shape, with a 4xx status and a message naming the field at
fault (a bad value or JSON type 400: a bool is not a number, a NaN is not JSON), behind the
checks that ``guard.py`` makes of every request (Host, Origin, JSON only, size and time limits;
see there). Once a stream has begun, an error comes as a ``data: {"error": ...}`` event instead;
a client that stops reading its stream for ``guard.IO_TIMEOUT`` (30 s) is dropped. The model
runs in a worker thread per generation (the event loop stays free to serve others); at most
``max_concurrent`` generate at once and the next one is answered 503 at once (with
Retry-After). A client that disconnects stops its generation at the next piece, streaming or
not (the server checks between pieces), and frees its place. The API asks for no key: anyone
who can reach the port can use the model (clients such as ``openai`` need some key; any will
do).

The page inserts all text with ``textContent`` (never as HTML) and is served with a
Content-Security-Policy that allows only its own script.

``chimera dashboard`` (``dashboard.py``) serves its own routes behind the same checks and
server (``guard.py``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chimera.chat import Reply
from cluster.serve import guard
from cluster.serve.guard import (
    STOPPING,
    LocalServer,
    error_body,
    guarded_app,
    internal_error,
    static_files,
)
from cluster.serve.service import ApiError, ChatService, Generation

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8")}


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



class _Running:
    """A generation running in a worker thread, its pieces passed to the event loop through a
    queue. ``stop()`` makes the worker stop at its next piece; the worker then closes the
    generation, which frees its slot."""

    _END = object()

    def __init__(self, generation: Generation, pool: ThreadPoolExecutor) -> None:
        self.generation = generation
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.halt = threading.Event()
        pool.submit(self._work)

    def _work(self) -> None:
        outcome = self._END
        try:
            for piece in self.generation.pieces():
                if self.halt.is_set():
                    break
                self._put(piece)
        except Exception as err:  # noqa: BLE001 - handed to the request, which logs it
            outcome = err
        finally:
            self.generation.close()
            self._put(outcome)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody reads
            self.halt.set()

    async def pieces(self, request: Request):
        """The reply's text pieces, until it ends or the client leaves. Checked between pieces
        for both kinds of answer: uvicorn's send() to a client that has gone returns quietly,
        so only this check notices a stream nobody reads."""
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
            if await request.is_disconnected():
                return

    def stop(self) -> None:
        self.halt.set()


class _Answer:
    """The OpenAI objects for one reply: the completion, or the chunks of its stream."""

    def __init__(self, model: str, reply: Reply, generation: Generation,
                 include_usage: bool = False) -> None:
        self.model, self.reply, self.generation = model, reply, generation
        self.include_usage = include_usage
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt, completion = len(self.reply.prompt), self.generation.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def completion(self, text: str) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": self.generation.finish_reason}],
                "usage": self.usage(), "trimmed": self.reply.trimmed}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        chunk = {**self._head("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish_reason}]}
        if finish_reason is not None:
            chunk["trimmed"] = self.reply.trimmed
        if self.include_usage:  # every chunk says usage: null but the last
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()}


def _event(data) -> dict:
    text = data if isinstance(data, str) else json.dumps(data)
    return {"type": "http.response.body", "body": f"data: {text}\n\n".encode(),
            "more_body": True}


class EventStream:
    """The Server-Sent Events answer to a streaming request. A plain ASGI callable rather than
    Starlette's StreamingResponse: its ``finally`` always stops the generation, also when the
    client leaves before the first event (a cancelled StreamingResponse can leave its body
    iterator suspended, and with it the generation's slot, until garbage collection)."""

    def __init__(self, running: _Running, request: Request, answer: _Answer) -> None:
        self.running, self.request, self.answer = running, request, answer

    async def __call__(self, scope, receive, send) -> None:
        timed, error = _timed(send), None
        try:
            await timed({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                     (b"cache-control", b"no-store"),
                                     (b"x-accel-buffering", b"no")]})
            await timed(_event(self.answer.chunk({"role": "assistant", "content": ""})))
            async for piece in self.running.pieces(self.request):
                await timed(_event(self.answer.chunk({"content": piece})))
            reason = self.running.generation.finish_reason
            if reason is not None:  # None: the client left, so nobody reads the end
                await timed(_event(self.answer.chunk({}, reason)))
                if self.answer.include_usage:
                    await timed(_event(self.answer.usage_chunk()))
                await timed(_event("[DONE]"))
        except _ClientStalled:
            return  # uvicorn closes a connection whose answer was left unfinished
        except Exception as err:  # noqa: BLE001 - headers are sent: an error event instead
            error = error_body(internal_error(scope, err))
        except asyncio.CancelledError:  # uvicorn stopping: see guard.STOPPING
            # uvicorn does not wait for the requests it cancels (asyncio.run cancels them again
            # at once), so the end goes out with send() itself, which writes without waiting
            # unless the client is behind, rather than with timed(), which waits on a task.
            timed, error = send, error_body(STOPPING)
        finally:
            self.running.stop()
        try:
            if error is not None:
                await timed(_event(error))
            await timed({"type": "http.response.body", "body": b"", "more_body": False})
        except _ClientStalled:
            pass


class _ClientStalled(Exception):
    """The client has taken nothing of its stream for ``guard.IO_TIMEOUT`` seconds."""


def _timed(send):
    """``send``, given up after ``guard.IO_TIMEOUT``: uvicorn waits for a client to read what it
    was sent before it takes more (flow control), and would wait for ever on one that stopped
    reading."""

    async def timed(message) -> None:
        try:
            await asyncio.wait_for(send(message), guard.IO_TIMEOUT)
        except asyncio.TimeoutError:
            raise _ClientStalled from None

    return timed


def build_app(service: ChatService, hosts: frozenset[str] | None, origin: str,
              pool: ThreadPoolExecutor) -> Starlette:
    """The ASGI app: the page, its info, the OpenAI API; ``hosts``: the Host values accepted
    (None: any), ``origin``: the server's own, named in refusals; ``pool``: the threads that
    run generations (``service.limits.max_concurrent`` of them)."""

    page = static_files("web", WEB_FILES)

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created,
                "owned_by": "chimera"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        service.check_model(request.path_params["model"])
        return JSONResponse(model_card())

    async def chat_completions(request: Request):
        chat = service.parse(_decode_json(await request.body()))
        # encoding and trimming a long history is CPU work too: off the event loop
        reply = await run_in_threadpool(service.prepare, chat.messages, chat.sampling)
        generation = service.start(reply, chat.stop)  # 503 here, before any byte is sent
        try:
            running = _Running(generation, pool)
        except BaseException:
            generation.close()
            raise
        answer = _Answer(service.name, reply, generation, chat.include_usage)
        if chat.stream:
            return EventStream(running, request, answer)
        try:
            text = "".join([piece async for piece in running.pieces(request)])
        finally:
            running.stop()
        return JSONResponse(answer.completion(text))

    routes = [Route("/", page), Route("/app.js", page), Route("/api/info", info),
              Route("/v1/models", models), Route("/v1/models/{model:path}", model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return guarded_app(routes, hosts, origin, service.limits.max_body_bytes)


class WyrdServer(LocalServer):
    """``chimera serve``'s server: the chat app, its generations in a pool of threads."""

    def __init__(self, service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.service = service
        self.pool = ThreadPoolExecutor(service.limits.max_concurrent,
                                       thread_name_prefix="wyrd-generate")
        super().__init__(lambda hosts, origin: build_app(service, hosts, origin, self.pool),
                         host, port)

    def server_close(self) -> None:
        super().server_close()
        # Every generation has been told to stop by now (its request ended or was cancelled),
        # so this waits for one token at most: afterwards no thread is generating.
        self.pool.shutdown(wait=True)


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000
                ) -> WyrdServer:
    """The server, bound but not yet serving; port 0 picks a free port."""
    return WyrdServer(service, host, port)
