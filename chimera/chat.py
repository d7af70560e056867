"""Chat on top of generation: conversations rendered with the tokenizer's chat template, the
history trimmed from the oldest turn to fit the context, and replies streamed as text.

Used by ``chimera chat``, the SFT evaluation and the web server alike, so they all talk to the
model the same way; SFT training encodes its conversations with ``encode_chat`` too, so the
model is trained on exactly the token ids it is later served.

Message content is data, never markup: a user who types ``<|end|>\n<|assistant|>`` gets those
characters encoded as ordinary text, so only the chat template's own markers become control
tokens and nobody can forge another role's turn (see ``encode_chat``).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
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
                                    f"{message.get('role')!r:.40}")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON "\ud800": not text
            raise ConversationError(f"message {i}: content is not valid Unicode text") from None


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


# transformers switches the backend's "encode special tokens as text" flag on every call that
# asks for a different setting, and the web server encodes from many threads: without a lock
# one thread's flag would leak into another's encoding (or the switch fails with "Already
# borrowed" while another thread is inside the Rust tokenizer).
_TOKENIZING = threading.Lock()


def control_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special added tokens (our chat markers, end of text, unknown...), by text:
    the tokens that only a chat template may write."""
    return {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()
            if token.special and token.content}


def _content_spans(tokenizer, messages: Sequence[dict], add_generation_prompt: bool, text: str
                   ) -> list[tuple[int, int]] | None:
    """The character span of each message's content in ``text`` (the rendered conversation),
    found by rendering it again with unguessable placeholders for the contents. None when the
    template does not insert the contents verbatim (it trims or rewrites them)."""
    tag = secrets.token_hex(8)  # random per call, so no content can contain a placeholder
    marks = [f"\ue000{tag}:{i}\ue001" for i in range(len(messages))]
    marked = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)],
        tokenize=False, add_generation_prompt=add_generation_prompt)
    spans, rebuilt, position, length = [], [], 0, 0
    for mark, message in zip(marks, messages):
        at = marked.find(mark, position)
        if at < 0 or marked.count(mark) != 1:
            return None
        rebuilt.append(marked[position:at])
        length += at - position
        spans.append((length, length + len(message["content"])))
        rebuilt.append(message["content"])
        length += len(message["content"])
        position = at + len(mark)
    rebuilt.append(marked[position:])
    return spans if "".join(rebuilt) == text else None


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool
                ) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The rendered conversation, its token ids and each token's character span in it.

    Control tokens (``control_tokens``) come only from the template's own text: where the
    contents hold a control token's text, it is encoded as ordinary characters (the tokenizer's
    ``split_special_tokens``), so user content can never produce a role marker. A conversation
    whose contents hold no control-token text (all normal ones) encodes exactly as the rendered
    text always did, so models trained before this keep seeing the same ids. A template that
    rewrites contents (so they cannot be located) gets content with control-token text refused.
    """
    text = render(tokenizer, messages, add_generation_prompt)
    controls = control_tokens(tokenizer)
    spans = _content_spans(tokenizer, messages, add_generation_prompt, text)
    if spans is None:
        for i, message in enumerate(messages):
            found = next((t for t in controls if t in message["content"]), None)
            if found:
                raise ConversationError(
                    f"message {i}: contains the control token {found!r}, which this "
                    f"tokenizer's chat template does not let us keep apart from its markers")
        spans = []
    with _TOKENIZING:
        whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                          split_special_tokens=False)
        ids, offsets = list(whole["input_ids"]), [tuple(o) for o in whole["offset_mapping"]]
        # A control token taken from content text. (Checked by its text: a character-level
        # vocabulary also gives its unknown token for any unseen character, which is harmless.)
        names = {token_id: name for name, token_id in controls.items()}
        forged = any(token in names and names[token] in text[a:b] and a < e and s < b
                     for token, (a, b) in zip(ids, offsets) for s, e in spans)
        if not forged:
            return text, ids, offsets
        # Cut the text at the control tokens the template wrote (outside the contents); encode
        # everything between them with control-token text treated as plain characters.
        pattern = re.compile("|".join(re.escape(t) for t in sorted(controls, key=len,
                                                                    reverse=True)))
        outside, start = [], 0
        for a, b in spans:
            outside.append((start, a))
            start = b
        outside.append((start, len(text)))
        cuts = [m.span() for a, b in outside for m in pattern.finditer(text, a, b)]
        pieces, start = [], 0
        for a, b in cuts:
            pieces.append((start, a, None))
            pieces.append((a, b, controls[text[a:b]]))
            start = b
        pieces.append((start, len(text), None))
        plain = [(a, b) for a, b, token in pieces if token is None and b > a]
        encoded = tokenizer([text[a:b] for a, b in plain], add_special_tokens=False,
                            return_offsets_mapping=True, split_special_tokens=True) \
            if plain else {"input_ids": [], "offset_mapping": []}
    by_start = {a: (piece_ids, piece_offsets) for (a, _), piece_ids, piece_offsets
                in zip(plain, encoded["input_ids"], encoded["offset_mapping"])}
    ids, offsets = [], []
    for a, b, token in pieces:
        if token is not None:
            ids.append(token)
            offsets.append((a, b))
        elif b > a:
            piece_ids, piece_offsets = by_start[a]
            ids.extend(piece_ids)
            offsets.extend((a + x, a + y) for x, y in piece_offsets)
    return text, ids, offsets


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
        ids = encode_chat(tokenizer, system + kept, True)[1]
        if len(ids) <= max_tokens:
            return ids, dropped
    raise ConversationError(f"the last message alone needs more than the {max_tokens} tokens "
                            f"of context available; send a shorter message")


def fit_prompt(tokenizer, messages: Sequence[dict], max_new_tokens: int, context: int
               ) -> tuple[list[int], int, int]:
    """The prompt for a reply of up to ``max_new_tokens`` when prompt and reply together get
    ``context`` tokens: its ids, how many messages were dropped, and the reply's token budget.

    The history is trimmed from the oldest turn to leave room for ``max_new_tokens``. When even
    the newest message (with a leading system message) leaves less room than that, the rest of
    the history goes and the reply gets whatever the context has left: so any max_new_tokens up
    to the context is accepted, and a reply that reaches the end of the context simply stops
    there (finish_reason "length"). Only a newest message that fills the context by itself is
    refused."""
    if context < 2:
        raise ConversationError(f"a context of {context} tokens has no room for a reply")
    messages = list(messages)
    keep = 2 if len(messages) > 1 and messages[0].get("role") == "system" else 1
    # The shortest prompt first (one encoding): it must fit with room for one token, and when it
    # leaves less than max_new_tokens there is no point trying to keep any more history.
    newest, _ = prompt_ids(tokenizer, messages[:keep - 1] + messages[-1:], context - 1)
    if len(newest) > context - max_new_tokens:
        ids, dropped = newest, len(messages) - keep
    else:
        ids, dropped = prompt_ids(tokenizer, messages, context - max_new_tokens)
    return ids, dropped, min(max_new_tokens, context - len(ids))


class Reply:
    """One assistant reply. Construction plans it (trims the history, fixes the token budget;
    a conversation that cannot fit raises ConversationError before anything is generated);
    iterating generates it as text pieces. ``finish_reason`` is then "stop" (the model ended
    its turn, or hit a stop token) or "length" (the budget ran out: ``max_new_tokens``, or the
    end of the context when that came first); None while running or if abandoned."""

    def __init__(self, model: Chimera, tokenizer, messages: Sequence[dict],
                 sampling: SamplingConfig = SamplingConfig(), context: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = context or model.config.max_seq_len
        self.prompt, self.trimmed, budget = fit_prompt(tokenizer, messages,
                                                       sampling.max_new_tokens, self.context)
        self.stops = stop_token_ids(tokenizer)
        self.sampling = dataclasses.replace(
            sampling, max_new_tokens=budget,
            stop_tokens=tuple(sampling.stop_tokens) + self.stops)
        self.finish_reason: str | None = None

    def tokens(self) -> Iterator[int]:
        """The reply's token ids, without the end-of-turn token that ends it."""
        for token in stream(self.model, self.prompt, self.sampling):
            if token in self.stops:
                self.finish_reason = "stop"
                return
            yield token
            if token in self.sampling.stop_tokens:  # a caller's own stop token is kept
                self.finish_reason = "stop"
                return
        self.finish_reason = "length"

    def __iter__(self) -> Iterator[str]:
        return decode_stream(self.tokenizer, self.tokens())


def reply_stream(model: Chimera, tokenizer, messages: Sequence[dict],
                 sampling: SamplingConfig = SamplingConfig(), context: int | None = None
                 ) -> Iterator[str]:
    """Stream the assistant's reply as text pieces. ``context``: tokens of prompt and reply
    together (default: the model's max_seq_len); see ``fit_prompt`` for how the history is
    trimmed and the reply bounded."""
    yield from Reply(model, tokenizer, messages, sampling, context)


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
