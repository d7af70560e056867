"""Tokenizers: train a byte-level BPE or a character-level vocabulary with the `tokenizers`
library, wrapped as a transformers fast tokenizer with Chimera's special tokens and chat
template, so ``save_pretrained`` / ``AutoTokenizer`` / ``apply_chat_template`` all work.

Any local tokenizer directory also loads through ``load_tokenizer`` (never from the network).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END_OF_TURN)
SPECIAL_TOKENS = (END_OF_TEXT, *CHAT_TOKENS)
UNKNOWN = "<|unk|>"  # character-level only: characters never seen in training

# Each turn: the role marker, a newline, the content, the end-of-turn marker, a newline. With
# add_generation_prompt the assistant marker is left open for the model to continue.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

BYTE_ALPHABET = 256


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded as asked."""


def _wrap(backend: Tokenizer, unk_token: str | None = None) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        unk_token=unk_token,
        additional_special_tokens=list(CHAT_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2
              ) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
    floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise TokenizerError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {floor} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    learned = backend.get_vocab_size()
    if learned < vocab_size:
        raise TokenizerError(
            f"vocab_size={vocab_size}: the corpus supports only {learned} tokens (too few "
            f"repeated byte pairs to learn more merges); use --vocab-size {learned} or less, "
            f"or a larger corpus")
    return _wrap(backend)


def train_char(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in the corpus (plus an unknown token for the rest)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise TokenizerError("cannot build a character vocabulary from an empty corpus")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, UNKNOWN, *sorted(chars)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS) + [UNKNOWN])
    return _wrap(backend, unk_token=UNKNOWN)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Any local tokenizer directory (ours or a Hugging Face one), fast tokenizers only."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise TokenizerError(f"{path}: cannot load a tokenizer: {err}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    return tokenizer


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalisation,
    pre-tokenisation and special tokens."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:32]


def end_of_text_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The document separator: our end-of-text token, else the tokenizer's EOS."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if token_id is None or token_id == tokenizer.unk_token_id:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise TokenizerError("the tokenizer has neither <|endoftext|> nor an EOS token to "
                             "separate documents")
    return token_id
