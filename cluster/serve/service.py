"""The chat service behind ``chimera serve``: it validates a chat completion request (the OpenAI
fields, JSON types, sampling values, the server's limits), fits the history into the model's
context and generates the reply's pieces, cut at the request's stop strings, counting the
generations that run at once. It knows nothing of HTTP or of the event loop (``server.py``)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from http import HTTPStatus

from chimera.chat import ConversationError, Reply, check_messages, decode_stream
from chimera.generation import SamplingConfig
from chimera.model import Chimera, param_counts_analytic

# The request fields this server uses (see server.py for what each means).
FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
          "stop", "seed", "stream", "stream_options")
# OpenAI fields that change nothing about the reply this server would give: accepted, ignored.
IGNORED = ("user", "metadata", "store", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "service_tier",
           "parallel_tool_calls")
# OpenAI fields for features this server lacks: accepted only when they ask for nothing (null or
# the value given here, the API's default), refused otherwise, so a client that relies on one
# learns at once instead of getting a reply that silently ignored it.
OFF = object()  # only null turns the feature off
UNSUPPORTED = {"n": 1, "logprobs": False, "top_logprobs": OFF, "frequency_penalty": 0,
               "presence_penalty": 0, "logit_bias": {}, "tools": [], "tool_choice": "none",
               "functions": [], "function_call": "none", "response_format": {"type": "text"},
               "modalities": ["text"], "audio": OFF, "prediction": OFF,
               "web_search_options": OFF, "reasoning_effort": OFF, "verbosity": OFF,
               "moderation": OFF}
MAX_TEMPERATURE = 2.0  # OpenAI's range and the page's; hotter is noise from a small model
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 200  # each piece is checked against every stop string: keep them short


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 4000
    max_messages: int = 64
    max_new_tokens: int = 512  # the most max_tokens a request may ask for
    max_body_bytes: int = 1_000_000
    max_concurrent: int = 8  # generations at once; more get 503

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # a limit of 0 would refuse every request
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field.name}={value!r}: must be a positive integer")


class ApiError(Exception):
    """A request refused: the HTTP status, a message naming what is wrong, the request field at
    fault (``param``) and a machine-readable ``code``, as in OpenAI's error object."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param, code)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _asks_nothing(value, off) -> bool:
    if value is None:
        return True
    if off is OFF:
        return False
    if _number(off):
        return _number(value) and value == off
    # the same type, so that true is not taken for n=1
    return type(value) is type(off) and value == off


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: list[dict]
    sampling: SamplingConfig
    stream: bool = False
    stop: tuple[str, ...] = ()
    include_usage: bool = False  # streaming: a last chunk with the token counts


class ChatService:
    """Validates requests and generates replies; shared by every request (and thread)."""

    def __init__(self, model: Chimera, tokenizer, name: str, limits: Limits = Limits(),
                 defaults: SamplingConfig = SamplingConfig(max_new_tokens=200, temperature=0.8,
                                                           top_p=0.95)) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.created = int(time.time())  # for GET /v1/models
        self.limits = limits
        self.defaults = dataclasses.replace(
            defaults, max_new_tokens=min(defaults.max_new_tokens, limits.max_new_tokens))
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.lock = threading.Lock()
        self.active = 0  # generations holding a slot now
        self.pieces_generated = 0  # text pieces (about a token each) over the server's life

    def info(self) -> dict:
        """What the page needs; every value advertised here is one a request may send."""
        return {"model": self.name, "params": param_counts_analytic(self.model.config).total,
                "context": self.model.config.max_seq_len, "limits": asdict(self.limits),
                "defaults": {"temperature": self.defaults.temperature,
                             "top_p": self.defaults.top_p,
                             "max_tokens": self.defaults.max_new_tokens}}

    def check_model(self, model) -> None:
        if not isinstance(model, str):
            raise _bad(f"model must be a string, the served model's id {self.name!r}", "model")
        if model != self.name:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model {model!r:.80} is not served here; this "
                                                 f"server serves {self.name!r}", "model",
                           "model_not_found")

    def parse(self, body) -> ChatRequest:
        """The request, checked: an ApiError names the first field at fault. A field sent as
        null means its default, as in the OpenAI API."""
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object", None)
        for field in body:
            if field in UNSUPPORTED and not _asks_nothing(body[field], UNSUPPORTED[field]):
                allowed = "null" if UNSUPPORTED[field] is OFF \
                    else f"null or {UNSUPPORTED[field]!r}"
                raise _bad(f"{field} is not supported by this server (only {allowed})", field,
                           "unsupported_parameter")
            if field not in FIELDS and field not in IGNORED and field not in UNSUPPORTED:
                raise _bad(f"unknown field {field!r:.60}; the fields are {', '.join(FIELDS)}",
                           field[:60], "unknown_parameter")
        if body.get("model") is not None:
            self.check_model(body["model"])
        messages = self._messages(body.get("messages"))
        streaming = body.get("stream")
        if streaming is not None and not isinstance(streaming, bool):
            raise _bad("stream must be true or false", "stream")
        return ChatRequest(messages, self._sampling(body), bool(streaming), self._stops(body),
                           self._include_usage(body.get("stream_options"), bool(streaming)))

    def _messages(self, messages) -> list[dict]:
        if not isinstance(messages, list):
            raise _bad("messages must be a list of {\"role\", \"content\"} objects", "messages")
        messages = [_plain_message(i, m) for i, m in enumerate(messages)]
        try:
            check_messages(messages)
        except ConversationError as err:
            raise _bad(f"messages: {err}", "messages") from None
        if len(messages) > self.limits.max_messages:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{len(messages)} messages: at most {self.limits.max_messages}; "
                           f"start a new chat", "messages")
        for i, message in enumerate(messages):
            if len(message["content"]) > self.limits.max_message_chars:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"message {i} has {len(message['content'])} characters: at "
                               f"most {self.limits.max_message_chars}", "messages")
        if messages[-1]["role"] != "user":
            raise _bad("the last message must be the user's", "messages")
        return messages

    def _sampling(self, body: dict) -> SamplingConfig:
        given = [f for f in ("max_tokens", "max_completion_tokens") if body.get(f) is not None]
        if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
            raise _bad("max_tokens and max_completion_tokens differ; send one of them",
                       "max_completion_tokens")
        field = given[0] if given else "max_tokens"
        max_tokens = body[field] if given else self.defaults.max_new_tokens
        if not _integer(max_tokens) or not 1 <= max_tokens <= self.limits.max_new_tokens:
            raise _bad(f"{field} must be an integer in [1, {self.limits.max_new_tokens}]", field)
        temperature = _default(body, "temperature", self.defaults.temperature)
        if not _number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise _bad(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}]",
                       "temperature")
        top_p = _default(body, "top_p", self.defaults.top_p)
        if not _number(top_p):
            raise _bad("top_p must be a number in (0, 1]", "top_p")
        seed = body.get("seed")
        if seed is not None and not _integer(seed):
            # JSON 1e400 parses to inf and 7.0 to a float: a seed is an integer
            raise _bad("seed must be an integer in [0, 2**63 - 1]", "seed")
        try:  # the ranges themselves (finite, not so cold it overflows...) are SamplingConfig's
            return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
        except ValueError as err:  # its message starts with the field: "temperature=..."
            name = str(err).split("=")[0]
            raise _bad(str(err), field if name == "max_new_tokens" else name) from None

    @staticmethod
    def _stops(body: dict) -> tuple[str, ...]:
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > MAX_STOPS \
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise _bad(f"stop must be a string or a list of at most {MAX_STOPS} strings, each "
                       f"of 1 to {MAX_STOP_CHARS} characters", "stop")
        return tuple(stops)

    @staticmethod
    def _include_usage(options, streaming: bool) -> bool:
        if options is None:
            return False
        if not streaming:
            raise _bad("stream_options is only allowed with \"stream\": true", "stream_options")
        # include_obfuscation pads chunks against length side channels on a network; a local
        # server's chunks are not worth padding, so asking for it changes nothing
        if not isinstance(options, dict) or set(options) - {"include_usage",
                                                            "include_obfuscation"} \
                or not all(isinstance(v, bool) for v in options.values()):
            raise _bad("stream_options must be {\"include_usage\": true or false}",
                       "stream_options")
        return options.get("include_usage", False)

    def prepare(self, messages: list[dict], sampling: SamplingConfig) -> Reply:
        """The reply, planned (history trimmed, token budget set) but not yet generated."""
        try:
            return Reply(self.model, self.tokenizer, messages, sampling)
        except ConversationError as err:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(err), "messages",
                           "context_length_exceeded") from None

    def start(self, reply: Reply, stop: Sequence[str] = ()) -> Generation:
        """Take a generation slot for the reply: a busy server refuses at once (503), before
        anything is sent. The slot is held until the Generation is closed."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again",
                           None, "server_busy")
        with self.lock:
            self.active += 1
        return Generation(self, reply, stop)

    def _release(self) -> None:
        with self.lock:
            self.active -= 1
        self.slots.release()


class Generation:
    """One reply holding a generation slot: ``pieces()`` generates its text, cut before the
    first stop string; ``close()`` (always, from the thread that iterates) frees the slot.
    ``finish_reason`` is then "stop" (the model ended its turn, or a stop string came) or
    "length" (the budget ran out), None if abandoned; ``completion_tokens`` counts the tokens
    generated."""

    def __init__(self, service: ChatService, reply: Reply, stop: Sequence[str]) -> None:
        self.service, self.reply = service, reply
        self.cut = StopStrings(stop)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._iterators: list[Iterator] = []  # to close: ours, and Reply's pieces under it
        self._closed = False

    def _counted(self, tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            self.completion_tokens += 1
            yield token

    def pieces(self) -> Iterator[str]:
        """The reply's text pieces (call once)."""
        self._iterators.append(self._generate())
        return self._iterators[0]

    def _generate(self) -> Iterator[str]:
        # Reply's own pieces (decode_stream of its tokens), with the tokens counted on the way.
        pieces = decode_stream(self.reply.tokenizer, self._counted(self.reply.tokens()))
        self._iterators.append(pieces)
        for piece in pieces:
            with self.service.lock:
                self.service.pieces_generated += 1
            text, stopped = self.cut.feed(piece)
            if text:
                yield text
            if stopped:
                self.finish_reason = "stop"
                return
        if self.cut.held:
            yield self.cut.held  # the reply ended: what looked like a stop string's start is not
        self.finish_reason = self.reply.finish_reason

    def close(self) -> None:
        """Stop generating and free the slot; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            for iterator in self._iterators:
                iterator.close()
        finally:
            self.service._release()


class StopStrings:
    """Cuts text arriving in pieces before the first stop string. A stop string can span
    pieces, so the end of the text that could begin one is held back until the next piece says
    whether it does; text handed out never holds the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that may be shown now, and whether a stop string ended the reply."""
        text = self.held + piece
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        hold = max((k for stop in self.stops for k in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:k])), default=0)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False


def _default(body: dict, field: str, default):
    value = body.get(field)
    return default if value is None else value


def _plain_message(i: int, message):
    """An OpenAI message as the chat template takes it: content given as a list of text parts
    is joined, and the "developer" role is the system's (OpenAI's newer name for it)."""
    if not isinstance(message, dict):
        return message  # check_messages says what is wrong with it
    message = dict(message)
    if message.get("role") == "developer":
        message["role"] = "system"
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) and set(p) == {"type", "text"}
                   for p in content):
            raise _bad(f"messages: message {i}: only text content parts "
                       f"({{\"type\": \"text\", \"text\": ...}}) are supported", "messages")
        message["content"] = "".join(p["text"] for p in content)
    return message
