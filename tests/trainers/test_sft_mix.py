"""Pretraining text mixed into chat fine-tuning batches: plain rows, loss on every token, at
the share asked for, from the training split only."""

import numpy as np
import pytest

from chimera.tokenizer import train_char
from trainers.corpus import CorpusSpec, iter_documents
from trainers.instructions import conversations
from trainers.recipe import TrainHparams
from trainers.sft import ChatBatches
from trainers.store import SplitConfig, prepare_store

CORPUS = CorpusSpec("stories", stories_bytes=20_000, seed=2)
CHATS = [record["messages"] for record in conversations(40, seed=0)]


@pytest.fixture(scope="module")
def store_and_tokenizer(tmp_path_factory):
    tokenizer = train_char([*iter_documents(CORPUS), *(m["content"] for c in CHATS for m in c)])
    store, _ = prepare_store(CORPUS, tokenizer, tmp_path_factory.mktemp("mix") / "store",
                             SplitConfig(val_fraction=0.2, seed=1))
    return store, tokenizer


def _is_window_of(row: np.ndarray, stream: np.ndarray) -> bool:
    starts = np.flatnonzero(stream[:len(stream) - len(row) + 1] == row[0])
    return any(np.array_equal(stream[s:s + len(row)], row) for s in starts)


@pytest.mark.parametrize("mix, plain_rows", [(0.5, 4), (0.25, 2), (0.0, 0), (0.99, 7)])
def test_a_share_of_every_batch_is_plain_training_text(store_and_tokenizer, mix, plain_rows):
    store, tokenizer = store_and_tokenizer
    hp = TrainHparams(batch_size=8, seq_len=160, eval_batches=1)
    batches = ChatBatches(CHATS, CHATS[:4], tokenizer, hp, seed=3, plain=store,
                          pretrain_mix=mix)
    train, val = store.tokens("train"), store.tokens("val")
    for step in range(3):
        tokens, mask = batches.batch(step)
        assert tokens.shape == (8, 161) and mask.shape == (8, 160)
        plain = [i for i in range(8) if bool(mask[i].all())]
        # Loss on every token of a plain row, a window of the training split (never of the
        # validation split); conversation rows keep their assistant-only mask.
        assert len(plain) == plain_rows
        for i in plain:
            row = tokens[i].numpy()
            assert _is_window_of(row, train) and not _is_window_of(row, val)
        for i in set(range(8)) - set(plain):
            assert 0 < int(mask[i].sum()) < 160
    again = ChatBatches(CHATS, CHATS[:4], tokenizer, hp, seed=3, plain=store,
                        pretrain_mix=mix)
    assert all(bool((a == b).all()) for a, b in zip(batches.batch(5), again.batch(5)))
    val_tokens, val_mask = batches.validation()[0]
    assert not bool(val_mask.all(dim=1).any())  # validation: conversations only


def test_a_mix_needs_a_store_and_a_share_below_one(store_and_tokenizer):
    store, tokenizer = store_and_tokenizer
    hp = TrainHparams(batch_size=4, seq_len=160, eval_batches=1)
    with pytest.raises(ValueError, match="needs the store"):
        ChatBatches(CHATS, CHATS, tokenizer, hp, pretrain_mix=0.5)
    for share in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ChatBatches(CHATS, CHATS, tokenizer, hp, plain=store, pretrain_mix=share)
