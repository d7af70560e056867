"""Chat on top of generation: conversations rendered with the tokenizer's chat template, the
history trimmed from the oldest turn to fit the context, and replies streamed as text.

Used by ``chimera chat``, the SFT evaluation and the web server alike, so they all talk to the
model the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence

from chimera.generation import SamplingConfig, stream
from chimera.model import Chimera
from chimera.tokenizer import END_OF_TEXT, END_OF_TURN

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be rendered (bad roles, empty, or too long to fit)."""


def check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ConversationError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} \
                or not isinstance(message.get("content"), str):
            raise ConversationError(f"message {i}: must be {{'role': ..., 'content': str}}, "
                                    f"got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise ConversationError(f"message {i}: role must be one of {ROLES}, not "
                                    f"{message.get('role')!r}")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """End of turn and end of text: either ends a reply."""
    ids = []
    for token in (END_OF_TURN, END_OF_TEXT, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    check_messages(messages)
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], int]:
    """Token ids of the conversation with the assistant's turn opened, dropping the oldest turns
    (a leading system message is kept) until it fits ``max_tokens``. Returns the ids and how many
    messages were dropped. The newest message alone must fit."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    for dropped in range(len(turns)):
        kept = turns[dropped:]
        if dropped and kept[0]["role"] == "assistant":
            continue  # a conversation resumes at a user turn
        ids = tokenizer(render(tokenizer, system + kept, True), add_special_tokens=False
                        )["input_ids"]
        if len(ids) <= max_tokens:
            return ids, dropped
    raise ConversationError(f"the last message alone needs more than the {max_tokens} tokens "
                            f"of context available; send a shorter message")


def reply_stream(model: Chimera, tokenizer, messages: Sequence[dict],
                 sampling: SamplingConfig = SamplingConfig(), context: int | None = None
                 ) -> Iterator[str]:
    """Stream the assistant's reply as text pieces. ``context``: tokens of prompt and reply
    together (default: the model's max_seq_len); the history is trimmed to leave room for
    ``max_new_tokens``."""
    context = context or model.config.max_seq_len
    room = context - sampling.max_new_tokens
    if room < 8:
        raise ConversationError(f"max_new_tokens {sampling.max_new_tokens} leaves no room for "
                                f"the conversation in a context of {context} tokens")
    ids, _ = prompt_ids(tokenizer, messages, room)
    stops = stop_token_ids(tokenizer)
    sampling = dataclasses.replace(sampling, stop_tokens=tuple(sampling.stop_tokens) + stops)
    yield from decode_stream(tokenizer, itertools.takewhile(
        lambda token: token not in stops, stream(model, ids, sampling)))


def decode_stream(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces as token ids arrive. The whole sequence is decoded each time, because a
    character can span several byte-level tokens; only complete characters are shown."""
    generated: list[int] = []
    shown = ""
    for token in tokens:
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def reply(model: Chimera, tokenizer, messages: Sequence[dict],
          sampling: SamplingConfig = SamplingConfig(), context: int | None = None) -> str:
    return "".join(reply_stream(model, tokenizer, messages, sampling, context))
