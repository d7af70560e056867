"""The Arrow token store: layout, zero-copy reads, sampling, reuse and every bad input."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from chimera.tokenizer import end_of_text_id, fingerprint, train_bpe, train_char
from trainers.corpus import CorpusError, CorpusSpec, iter_documents
from trainers.store import (
    SplitConfig,
    StoreError,
    TokenStore,
    prepare_store,
    saved_tokenizer,
    token_dtype,
)

STORIES = CorpusSpec("stories", stories_bytes=60_000, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_char(iter_documents(STORIES))


@pytest.fixture
def store(tmp_path, tokenizer):
    return prepare_store(STORIES, tokenizer, tmp_path / "store",
                         SplitConfig(val_fraction=0.2, seed=3))[0]


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_store_holds_every_document_followed_by_end_of_text(store, tokenizer):
    docs = list(iter_documents(STORIES))
    eot = end_of_text_id(tokenizer)
    rebuilt = {}
    for split in ("train", "val"):
        tokens, offsets = store.tokens(split), store.document_offsets(split)
        assert tokens.dtype == np.uint8  # the smallest type that holds a char vocabulary
        for start, end in zip(offsets[:-1], offsets[1:]):
            assert tokens[end - 1] == eot
            rebuilt[tokenizer.decode(tokens[start:end - 1].tolist())] = split
    assert set(rebuilt) == set(docs)  # a split by document: each whole, in exactly one split
    info = store.info("train"), store.info("val")
    assert info[0].documents + info[1].documents == len(docs)
    assert info[0].bytes + info[1].bytes == sum(len(d.encode()) for d in docs)
    assert 0.1 < info[1].documents / len(docs) < 0.3


def test_readers_are_zero_copy_memory_maps(store):
    tokens = store.tokens("train")
    assert not tokens.flags.owndata and not tokens.flags.writeable
    reopened = TokenStore.open(store.root).tokens("train")
    assert np.array_equal(tokens, reopened)


def test_sampling_is_deterministic_and_draws_packed_windows(store):
    a = store.sample("train", batch_size=4, seq_len=32, seed=11, step=5)
    assert a.shape == (4, 33) and a.dtype == torch.int64
    assert torch.equal(a, store.sample("train", 4, 32, seed=11, step=5))
    assert not torch.equal(a, store.sample("train", 4, 32, seed=11, step=6))
    assert not torch.equal(a, store.sample("train", 4, 32, seed=12, step=5))
    stream = torch.from_numpy(store.tokens("train").astype(np.int64))
    for row in a:  # every row is a contiguous slice of the packed stream
        starts = (stream.unfold(0, 33, 1) == row).all(dim=1).nonzero()
        assert len(starts) >= 1
    it = store.batches("train", 4, 32, seed=11, start_step=5)
    assert torch.equal(next(it), a)


def test_validation_batches_are_a_fixed_set(store):
    first = store.validation_batches(batch_size=3, seq_len=16, max_batches=4)
    again = TokenStore.open(store.root).validation_batches(3, 16, max_batches=4)
    assert len(first) == 4 and all(torch.equal(x, y) for x, y in zip(first, again))
    stream = store.tokens("val").astype(np.int64)
    assert first[0][1].tolist() == stream[16:33].tolist()  # consecutive windows


def test_bits_per_byte_uses_the_splits_bytes_per_token(store):
    info = store.info("val")
    assert math.isclose(store.bits_per_byte(math.log(2), "val"), info.tokens / info.bytes)


def test_preparing_again_reuses_the_store(tmp_path, tokenizer):
    out = tmp_path / "store"
    _, reused = prepare_store(STORIES, tokenizer, out)
    assert not reused
    stamp = (out / "train.arrow").stat().st_mtime_ns
    store, reused = prepare_store(STORIES, tokenizer, out)
    assert reused and (out / "train.arrow").stat().st_mtime_ns == stamp
    other_split = prepare_store(STORIES, tokenizer, out, SplitConfig(val_fraction=0.5))
    assert not other_split[1]
    other_corpus = CorpusSpec("stories", stories_bytes=60_000, seed=2)
    assert not prepare_store(other_corpus, tokenizer, out)[1]
    assert _leftovers(tmp_path) == []


def test_a_trained_tokenizer_is_reused_only_for_the_same_corpus_and_recipe(tmp_path, tokenizer):
    prepare_store(STORIES, tokenizer, tmp_path / "s", tokenizer_recipe="char")
    saved = saved_tokenizer(tmp_path / "s", STORIES, "char")
    assert saved is not None and fingerprint(saved) == fingerprint(tokenizer)
    assert saved_tokenizer(tmp_path / "s", STORIES, "bpe:512") is None
    assert saved_tokenizer(tmp_path / "s", CorpusSpec("stories", seed=9), "char") is None


def test_a_store_from_another_tokenizer_is_refused(store):
    other = train_bpe(iter_documents(STORIES), vocab_size=300)
    with pytest.raises(StoreError, match="made with another tokenizer"):
        TokenStore.open(store.root, expected_tokenizer=fingerprint(other))


def test_truncated_and_corrupted_stores_are_refused(store):
    path = store.root / "train.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupted or truncated"):
        TokenStore.open(store.root)
    flipped = bytearray(data)
    tokens = store.tokens("train")
    # Find the token buffer in the file and change one token.
    index = data.find(tokens[:64].tobytes())
    flipped[index + 10] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="fails its checksum"):
        TokenStore.open(store.root)
    meta = json.loads((store.root / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] += 1
    (store.root / "meta.json").write_text(json.dumps(meta))
    path.write_bytes(data)
    with pytest.raises(StoreError, match="the store is damaged"):
        TokenStore.open(store.root)
    (store.root / "val_docs.arrow").unlink()
    with pytest.raises(StoreError, match="missing"):
        TokenStore.open(store.root)


def test_not_a_store_and_other_schema_versions_are_refused(tmp_path, store):
    with pytest.raises(StoreError, match="not a token store"):
        TokenStore.open(tmp_path / "nothing")
    meta = json.loads((store.root / "meta.json").read_text())
    meta["schema_version"] = 99
    (store.root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 99"):
        TokenStore.open(store.root)


def test_a_corpus_too_small_to_split_leaves_nothing_behind(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text("only one document here")
    with pytest.raises(StoreError, match="has 1 document"):
        prepare_store(CorpusSpec(str(path)), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_failed_rebuild_keeps_the_previous_store(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "store"
    prepare_store(STORIES, tokenizer, out)
    before = (out / "train.arrow").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("trainers.store._write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_store(STORIES, tokenizer, out, SplitConfig(val_fraction=0.3))
    assert (out / "train.arrow").read_bytes() == before
    assert TokenStore.open(out).meta["split"]["val_fraction"] == 0.05
    assert _leftovers(tmp_path) == []


def test_split_too_short_for_a_window_is_a_clear_error(store):
    with pytest.raises(StoreError, match="fewer than one window"):
        store.sample("val", 2, 10**7, seed=0, step=0)


def test_empty_corpus_and_bad_fraction(tmp_path, tokenizer):
    (tmp_path / "e.txt").write_text("   \n")
    with pytest.raises(CorpusError, match="empty"):
        prepare_store(CorpusSpec(str(tmp_path / "e.txt")), tokenizer, tmp_path / "o")
    with pytest.raises(StoreError, match="val_fraction"):
        SplitConfig(val_fraction=1.0)


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(70_000) == np.uint32


@pytest.mark.parametrize("make", ["user-folder", "file", "store-with-extra-file"])
def test_only_a_store_is_ever_replaced(tmp_path, tokenizer, make):
    out = tmp_path / "out"
    if make == "file":
        out.write_text("the user's file\n")
    else:
        if make == "store-with-extra-file":
            prepare_store(STORIES, tokenizer, out)
        else:
            out.mkdir()
        (out / "notes.txt").write_text("the user's notes\n")
    with pytest.raises(StoreError, match="not a token store|not a directory"):
        prepare_store(STORIES, train_char(["other text"]), out)
    assert (out.read_text() if make == "file" else (out / "notes.txt").read_text()) \
        .startswith("the user's")
    assert _leftovers(tmp_path) == []


def test_the_current_directory_is_never_the_store(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="current directory"):
        prepare_store(STORIES, tokenizer, ".")
    assert list(tmp_path.iterdir()) == []


def test_scratch_directories_of_killed_builds_are_removed(tmp_path, tokenizer):
    """A build killed midway leaves its temporary directory; the next build beside it removes
    those whose process is gone, and leaves a live process's and another host's alone."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    names = {"dead": f".store.tmp-{host}-{gone.stdout.strip()}-abc",
             "dead-old": f".store.old-{host}-{gone.stdout.strip()}-def",
             "live": f".store.tmp-{host}-{os.getpid()}-ghi",
             "other-host": ".store.tmp-elsewhere-1-jkl"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.arrow").write_bytes(b"partial")
    prepare_store(STORIES, tokenizer, tmp_path / "store")
    assert _leftovers(tmp_path) == sorted([names["live"], names["other-host"]])
