"""Tokenizers: round trips, special tokens, the chat template, loading, fingerprints."""

import pytest

from chimera.tokenizer import (
    ASSISTANT,
    END_OF_TEXT,
    END_OF_TURN,
    USER,
    TokenizerError,
    end_of_text_id,
    fingerprint,
    load_tokenizer,
    train_bpe,
    train_char,
)

TEXTS = ["The cat sat on the mat. The dog sat on the log."] * 30 + \
        ["Héllo wörld, naïve café! 🙂 Tabs\tand\nnewlines."] * 5


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, vocab_size=300)


def test_bpe_round_trips_any_text_including_unseen_characters(bpe):
    for text in ["The cat sat.", "Héllo 🙂\n\tend", "Completely unseen: 日本語 ∑ ✓"]:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_for_frequent_words(bpe):
    assert len(bpe.encode("The cat sat on the mat.")) < len("The cat sat on the mat.") / 2


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unknown():
    tokenizer = train_char(["abc\nd e"])
    assert tokenizer.decode(tokenizer.encode("a b\nc")) == "a b\nc"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("az")) == ["a", "<|unk|>"]
    assert len(tokenizer) == 5 + 1 + len(set("abc\nd e"))  # specials + unknown + characters


def test_special_tokens_are_single_ids(bpe):
    for token in (END_OF_TEXT, USER, ASSISTANT, END_OF_TURN):
        assert bpe.convert_ids_to_tokens(bpe.encode(token)) == [token]
    assert end_of_text_id(bpe) == bpe.convert_tokens_to_ids(END_OF_TEXT)


def test_chat_template_output(bpe):
    messages = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}]
    text = bpe.apply_chat_template(messages, tokenize=False)
    assert text == ("<|system|>\nBe kind.<|end|>\n<|user|>\nHi!<|end|>\n"
                    "<|assistant|>\nHello.<|end|>\n")
    prompt = bpe.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi!<|end|>\n<|assistant|>\n")
    ids = bpe.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert bpe.decode(ids) == text and ids.count(bpe.convert_tokens_to_ids(END_OF_TURN)) == 3


def test_chat_template_rejects_unknown_roles(bpe):
    with pytest.raises(Exception, match="not tool"):
        bpe.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_tokenizer_loads_through_auto_tokenizer_with_the_same_fingerprint(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert fingerprint(loaded) == fingerprint(bpe)
    assert loaded.encode("The cat 🙂") == bpe.encode("The cat 🙂")
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) \
        == "<|user|>\nx<|end|>\n"
    assert fingerprint(train_bpe(TEXTS, vocab_size=290)) != fingerprint(bpe)


def test_vocab_size_the_corpus_cannot_support_is_a_clear_error():
    with pytest.raises(TokenizerError, match="supports only"):
        train_bpe(["tiny corpus"], vocab_size=5000)
    with pytest.raises(TokenizerError, match="at least 261"):
        train_bpe(TEXTS, vocab_size=100)


def test_loading_a_missing_or_broken_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)
