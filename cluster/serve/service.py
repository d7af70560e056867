"""The chat service behind ``chimera serve``: it validates a request (JSON types, sampling values,
the server's limits), fits the history into the model's context and generates the reply's
pieces, counting the generations that run at once. It knows nothing of HTTP (``server.py``)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from http import HTTPStatus

from chimera.chat import ConversationError, Reply, check_messages
from chimera.generation import SamplingConfig
from chimera.model import Chimera, param_counts_analytic

FIELDS = ("messages", "temperature", "top_p", "max_tokens", "seed", "stream")
MAX_TEMPERATURE = 2.0  # the page's range; hotter is noise from a small model


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
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        """What the page needs; every value advertised here is one a request may send."""
        return {"model": self.name, "params": param_counts_analytic(self.model.config).total,
                "context": self.model.config.max_seq_len, "limits": asdict(self.limits),
                "defaults": {"temperature": self.defaults.temperature,
                             "top_p": self.defaults.top_p,
                             "max_tokens": self.defaults.max_new_tokens}}

    def parse(self, body) -> tuple[list[dict], SamplingConfig, bool]:
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r:.60}; the "
                                                   f"fields are {', '.join(FIELDS)}")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           "messages must be a list of {\"role\", \"content\"} objects")
        try:
            check_messages(messages)
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
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) \
                or not 1 <= max_tokens <= self.limits.max_new_tokens:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"max_tokens must be an integer in [1, {self.limits.max_new_tokens}]")
        temperature = body.get("temperature", self.defaults.temperature)
        if not _number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"temperature must be a number in [0, {MAX_TEMPERATURE:g}]")
        top_p = body.get("top_p", self.defaults.top_p)
        if not _number(top_p):
            raise ApiError(HTTPStatus.BAD_REQUEST, "top_p must be a number in (0, 1]")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            # JSON 1e400 parses to inf and 7.0 to a float: a seed is an integer
            raise ApiError(HTTPStatus.BAD_REQUEST, "seed must be an integer in [0, 2**63 - 1]")
        streaming = body.get("stream", False)
        if not isinstance(streaming, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, "stream must be true or false")
        try:  # the ranges themselves (finite, not so cold it overflows...) are SamplingConfig's
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed)
        except ValueError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return messages, sampling, streaming

    def prepare(self, messages: list[dict], sampling: SamplingConfig) -> Reply:
        """The reply, planned (history trimmed, token budget set) but not yet generated."""
        try:
            return Reply(self.model, self.tokenizer, messages, sampling)
        except ConversationError as err:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(err)) from None

    def pieces(self, reply: Reply) -> Iterator[str]:
        """The reply's text pieces; counts the generation as active while it runs. Closing the
        generator stops the generation and frees its slot."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again")
        with self.lock:
            self.active += 1
        try:
            for piece in reply:
                with self.lock:
                    self.pieces_generated += 1
                yield piece
        finally:
            with self.lock:
                self.active -= 1
            self.slots.release()
