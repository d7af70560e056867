"""Chat fine-tuning (SFT): conversations rendered with the tokenizer's chat template, loss on the
assistant's tokens only.

Which tokens are the assistant's is found from the template itself, not from knowledge of its
markers: rendering the conversation up to each assistant turn (with the generation prompt) and
up to the end of that turn gives the character span the assistant wrote (its content and its
end-of-turn marker, so the model learns to stop). Tokens whose characters fall in those spans
are the ones that count. This works for any template that renders a conversation's prefix as a
prefix of the whole, which every chat template we know does (and it is checked).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from chimera.chat import (
    ConversationError,
    check_messages,
    encode_chat,
    prompt_ids,
    render,
    reply,
)
from chimera.checkpoint import atomic_write
from chimera.generation import SamplingConfig
from chimera.model import Chimera, resize_vocabulary
from chimera.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS
from trainers.answers import answer_is_right
from trainers.fit import Batch
from trainers.recipe import TrainHparams
from trainers.store import TokenStore

QA_NEW_TOKENS = 24  # the longest answer question answering scores


class ChatDataError(ValueError):
    """A conversations file that is missing, unreadable or malformed."""


def load_conversations(path: str | Path) -> list[list[dict]]:
    """JSONL, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    if path.is_dir():
        raise ChatDataError(f"{path}: is a directory; give a JSONL file of conversations")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ChatDataError(f"{path}: not UTF-8 text (byte {err.start}): a JSONL file of "
                            f"conversations is expected") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["messages"]
            check_messages(messages)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ChatDataError(f"{path}:{number}: not a conversation record "
                                f"({type(err).__name__}: {err})") from None
        if not any(message["role"] == "assistant" for message in messages):
            # fine-tuning learns only the assistant's turns: this one would teach nothing
            raise ChatDataError(f"{path}:{number}: the conversation has no assistant turn, "
                                f"so there is nothing to learn from it")
        conversations.append(messages)
    if not conversations:
        raise ChatDataError(f"{path}: no conversations")
    return conversations


def write_conversations(records: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def encode_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether the assistant wrote it."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        through_turn = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        end = len(through_turn)
        if not text.startswith(through_turn):
            raise ChatDataError("the chat template does not render a conversation's prefix as "
                                "a prefix of the whole; assistant tokens cannot be located")
        spans.append((start, end))
    # The same encoding the chat and the web server use for prompts: text in the messages that
    # spells a control token stays text, so training and serving see the same ids.
    _, ids, offsets = encode_chat(tokenizer, messages, add_generation_prompt=False)
    mask = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in offsets]
    return ids, mask


def ensure_chat_tokens(model: Chimera, tokenizer) -> tuple[Chimera, list[str]]:
    """Give the tokenizer Chimera's chat tokens and template where it lacks them, and grow the
    model's vocabulary to match (trained rows kept). Returns the model and the tokens added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHAT_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if not getattr(tokenizer, "chat_template", None) or missing:
        tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) > model.config.vocab_size:
        model = resize_vocabulary(model, len(tokenizer))
    return model, missing


class ChatBatches:
    """Conversations as fixed-length rows (padded, or dropped when longer than a window), each
    with its loss mask: the targets the assistant wrote. Batches are a function of the step.

    With ``plain`` (the pretraining store) and ``pretrain_mix`` > 0, that share of each batch's
    rows are windows of the store's training split with the loss on every token, as in
    nanochat's mid-training: the model keeps predicting the corpus while it learns to chat,
    instead of forgetting it. The validation batches stay conversations only."""

    def __init__(self, conversations: Sequence[Sequence[dict]], val: Sequence[Sequence[dict]],
                 tokenizer, hparams: TrainHparams, seed: int = 0,
                 plain: TokenStore | None = None, pretrain_mix: float = 0.0) -> None:
        if not 0.0 <= pretrain_mix < 1.0:
            raise ValueError(f"pretrain_mix={pretrain_mix}: must be in [0, 1) (a batch needs "
                             f"conversation rows)")
        if pretrain_mix and plain is None:
            raise ValueError("pretrain_mix needs the store whose training text is mixed in")
        self.hparams, self.seed = hparams, seed
        self.plain = plain
        # At least one conversation row in every batch, however high the share.
        self.plain_rows = min(hparams.batch_size - 1, round(hparams.batch_size * pretrain_mix))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train_rows, self.dropped = self._encode(conversations, tokenizer)
        self.val_rows, _ = self._encode(val, tokenizer)
        if not self.train_rows:
            raise ChatDataError(f"no conversation fits in seq_len {hparams.seq_len} + 1 tokens")

    def _encode(self, conversations, tokenizer):
        rows, dropped = [], 0
        width = self.hparams.seq_len + 1
        for messages in conversations:
            ids, mask = encode_conversation(tokenizer, messages)
            if len(ids) > width or not any(mask):
                dropped += 1
                continue
            tokens = np.full(width, self.pad, dtype=np.int64)
            targets = np.zeros(width - 1, dtype=bool)
            tokens[:len(ids)] = ids
            targets[:len(ids) - 1] = mask[1:]  # target t is token t + 1
            rows.append((tokens, targets))
        return rows, dropped

    def _stack(self, rows) -> Batch:
        return (torch.from_numpy(np.stack([t for t, _ in rows])),
                torch.from_numpy(np.stack([m for _, m in rows])))

    def batch(self, step: int) -> Batch:
        n, size = len(self.train_rows), self.hparams.batch_size - self.plain_rows
        epoch_len = max(1, n // size)
        epoch, position = divmod(step, epoch_len)
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        picked = [order[(position * size + i) % n] for i in range(size)]
        rows = [self.train_rows[i] for i in picked]
        if self.plain_rows:
            # Drawn as pretraining drew its batches (with the same seed, the windows its first
            # steps began with): text of the training split only.
            windows = self.plain.sample("train", self.plain_rows, self.hparams.seq_len,
                                        self.seed, step).numpy()
            rows += [(w, np.ones(len(w) - 1, dtype=bool)) for w in windows]
            # Shuffled in, so that every worker's slice of the batch holds both kinds.
            rows = [rows[i] for i in np.random.default_rng((self.seed, step)).permutation(
                len(rows))]
        return self._stack(rows)

    def validation(self) -> list[Batch]:
        size = self.hparams.batch_size
        rows = self.val_rows[:size * self.hparams.eval_batches]
        return [self._stack(rows[i:i + size]) for i in range(0, len(rows), size)]


def fitting(tokenizer, items: Sequence[dict], context: int, max_new_tokens: int = 24
            ) -> list[dict]:
    """The question items whose prompt leaves room for the answer in ``context`` tokens."""
    kept = []
    for item in items:
        try:
            prompt_ids(tokenizer, item["messages"], context - max_new_tokens)
            kept.append(item)
        except ConversationError:
            pass
    return kept


def qa_answers_right(model: Chimera, tokenizer, items: Sequence[dict],
                     max_new_tokens: int = QA_NEW_TOKENS, context: int | None = None
                     ) -> list[bool]:
    """For each question, whether the greedy reply gives the expected answer and no other
    candidate (``trainers.answers.answer_is_right``). Items are ``{"messages": [...],
    "expected": str, "others": [str, ...]}`` (see ``trainers.chat_data.qa_item``; "others"
    may be left out). Per question, so that two models can be compared pair by pair."""
    if not items:
        raise ValueError("no questions to score")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    return [answer_is_right(item["expected"],
                            reply(model, tokenizer, item["messages"], sampling, context),
                            item.get("others", ())) for item in items]


def qa_accuracy(model: Chimera, tokenizer, items: Sequence[dict],
                max_new_tokens: int = QA_NEW_TOKENS, context: int | None = None) -> float:
    """Share of questions answered right (``qa_answers_right``)."""
    right = qa_answers_right(model, tokenizer, items, max_new_tokens, context)
    return sum(right) / len(right)
