"""Chat fine-tuning: the loss mask, vocabulary extension, the data, and training on it."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from chimera.chat import ConversationError, prompt_ids, reply
from chimera.config import ChimeraConfig
from chimera.generation import SamplingConfig
from chimera.model import Chimera
from chimera.tokenizer import CHAT_TOKENS, END_OF_TURN, train_bpe, train_char
from trainers.fit import FitSettings, fit
from trainers.instructions import conversations, qa_items, questions_about
from trainers.recipe import TrainHparams
from trainers.sft import (
    ChatBatches,
    ChatDataError,
    encode_conversation,
    ensure_chat_tokens,
    load_conversations,
    qa_accuracy,
)
from trainers.stories import generate_story

MESSAGES = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Who is the story about?"},
            {"role": "assistant", "content": "The story is about Lily."},
            {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Near the park."}]


@pytest.fixture(scope="module")
def bpe():
    texts = [r["messages"][0]["content"] for r in conversations(60)] + [m["content"]
                                                                       for m in MESSAGES]
    return train_bpe(texts, vocab_size=400)


def test_mask_covers_exactly_the_assistant_tokens(bpe):
    ids, mask = encode_conversation(bpe, MESSAGES)
    assert len(ids) == len(mask)
    assistant = bpe.decode([t for t, m in zip(ids, mask) if m])
    other = bpe.decode([t for t, m in zip(ids, mask) if not m])
    # The assistant's content and its end-of-turn marker: nothing else, nothing missing.
    assert assistant == f"The story is about Lily.{END_OF_TURN}\nNear the park.{END_OF_TURN}\n"
    assert "Lily" not in other and "Who is the story about?" in other and "Be kind." in other
    # The mask is contiguous per assistant turn: exactly two runs of True.
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 2


def test_batches_shift_the_mask_onto_targets(bpe):
    hp = TrainHparams(batch_size=2, seq_len=96, eval_batches=1)
    batches = ChatBatches([MESSAGES], [MESSAGES], bpe, hp)
    tokens, mask = batches.batch(0)
    ids, token_mask = encode_conversation(bpe, MESSAGES)
    row, row_mask = tokens[0], mask[0]
    targets = row[1:][row_mask]
    assert targets.tolist() == [t for t, m in zip(ids, token_mask) if m]
    assert not row_mask[len(ids) - 1:].any()  # padding never counts


def test_vocabulary_extension_keeps_the_trained_rows():
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                      pad_token="[UNK]")
    config = ChimeraConfig(vocab_size=3, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                           window_size=8, max_seq_len=64, tie_embeddings=False)
    model = Chimera(config)
    old_embed, old_head = model.embed.weight.clone(), model.lm_head.weight.clone()
    model, added = ensure_chat_tokens(model, foreign)
    assert added == list(CHAT_TOKENS) and model.config.vocab_size == 3 + len(CHAT_TOKENS)
    assert torch.equal(model.embed.weight[:3], old_embed)
    assert torch.equal(model.lm_head.weight[:3], old_head)
    assert torch.allclose(model.embed.weight[3:], old_embed.mean(0).expand(4, -1))
    ids, mask = encode_conversation(foreign, MESSAGES[1:3])  # the template now works
    assert any(mask) and max(ids) < model.config.vocab_size
    _, again = ensure_chat_tokens(model, foreign)
    assert again == []  # idempotent


def test_questions_have_answers_in_the_story():
    story = generate_story(5, 3)
    for q in questions_about(story):
        assert q.expected.split()[-1] in story.text, q
        assert q.expected in q.answer or q.expected.lower() in q.answer.lower()
    items = qa_items(5)
    assert all(i["expected"] in i["messages"][0]["content"] for i in items)
    train_text = json.dumps(conversations(50))
    assert items[0]["messages"][0]["content"] not in train_text  # held out


def test_conversations_file_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"chat.jsonl:3: .*role must be one of"):
        load_conversations(path)
    with pytest.raises(ChatDataError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")


def test_history_is_trimmed_from_the_oldest_turn(bpe):
    long = [{"role": "system", "content": "Be kind."}]
    for i in range(6):
        long += [{"role": "user", "content": f"Question number {i} about the story?"},
                 {"role": "assistant", "content": f"Answer number {i}."}]
    long.append({"role": "user", "content": "Last question?"})
    full, dropped = prompt_ids(bpe, long, 10_000)
    assert dropped == 0
    ids, dropped = prompt_ids(bpe, long, len(full) - 5)
    assert dropped == 2  # one user + assistant pair, so the rest starts at a user turn
    text = bpe.decode(ids)
    assert text.startswith("<|system|>\nBe kind.") and "number 0" not in text
    assert "number 1" in text and text.endswith("<|assistant|>\n")
    with pytest.raises(ConversationError, match="shorter message"):
        prompt_ids(bpe, long, 3)


def test_sft_learns_a_fixed_reply():
    """A tiny model fine-tuned on one exchange replies with it (and stops at end of turn)."""
    tokenizer = train_char(["Hello! Hi there, friend. " * 3])
    config = ChimeraConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=32, max_seq_len=64)
    torch.manual_seed(0)
    model = Chimera(config)
    exchange = [[{"role": "user", "content": "Hello!"},
                 {"role": "assistant", "content": "Hi there, friend."}]]
    hp = TrainHparams(batch_size=4, seq_len=48, learning_rate=1e-2, warmup_fraction=0.0,
                      eval_batches=1)
    result = fit(model, hp, ChatBatches(exchange, exchange, tokenizer, hp),
                 FitSettings(steps=60))
    assert result.val_loss < 0.05
    assert reply(model, tokenizer, exchange[0][:1], SamplingConfig(24, temperature=0)) \
        == "Hi there, friend."
    items = [{"messages": exchange[0][:1], "expected": "friend"},
             {"messages": exchange[0][:1], "expected": "Lily"}]
    assert qa_accuracy(model, tokenizer, items) == 0.5
