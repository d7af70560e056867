"""Resume survives a damaged newest checkpoint: it falls back to the older ones kept, and no
error ever relays torch's advice to load with ``weights_only=False``."""

import pytest
import torch

from chimera.config import ChimeraConfig
from chimera.tokenizer import train_char
from trainers.checkpoints import CheckpointManager, CheckpointStateError
from trainers.corpus import CorpusSpec, iter_documents
from trainers.fit import FitSettings
from trainers.pretrain import PretrainPlan, pretrain
from trainers.recipe import TrainHparams
from trainers.store import prepare_store

CORPUS = CorpusSpec("stories", stories_bytes=20_000, seed=0)
HPARAMS = TrainHparams(batch_size=4, seq_len=32, eval_batches=1, learning_rate=3e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tokenizer = train_char(iter_documents(CORPUS))
    return prepare_store(CORPUS, tokenizer, tmp_path_factory.mktemp("s") / "store")[0]


def _plan(store, steps=6):
    config = ChimeraConfig(vocab_size=store.vocab_size, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=16, max_seq_len=64)
    return PretrainPlan(config, HPARAMS, FitSettings(steps=steps, checkpoint_every=1,
                                                     keep_checkpoints=3), seed=1)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_tensor_bit(path):
    # A bit in the middle of the file: tensor bytes, which torch itself never checks.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _flip_pickle_bit(path):
    # A bit in the first opcode of the pickled structure (the zip's first entry, data.pkl):
    # torch's weights-only unpickler rejects it with a message that advises weights_only=False.
    data = bytearray(path.read_bytes())
    assert data[:4] == b"PK\x03\x04"
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    data[start] ^= 0x10
    path.write_bytes(bytes(data))


def _interrupted_run(store, directory, stop_after=4):
    plan = _plan(store)
    _, first = pretrain(plan, store, directory, stop_after=stop_after)
    assert first.interrupted
    return plan, CheckpointManager(directory)


@pytest.mark.parametrize("damage", [_truncate, _flip_tensor_bit, _flip_pickle_bit],
                         ids=["truncated", "bit-in-weights", "bit-in-pickle"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(store, tmp_path, damage):
    plan, manager = _interrupted_run(store, tmp_path / "ckpt")
    newest = manager.latest()
    assert newest.name == "step-00000004.pt"
    damage(newest)
    if damage is _flip_pickle_bit:  # torch's own error, not the digest, must catch this one
        newest.with_name(newest.name + ".sha256").unlink()
    messages = []
    _, resumed = pretrain(plan, store, tmp_path / "ckpt", on_message=messages.append)
    assert resumed.step == 6 and not resumed.interrupted
    warning, resume = messages[0], messages[1]
    assert warning.startswith("warning: ") and str(newest) in warning and "\n" not in warning
    assert "weights_only" not in warning
    assert "step-00000003.pt" in resume and "step 3 of 6" in resume
    # Resuming from the step before gives exactly the uninterrupted run.
    straight, _ = pretrain(plan, store, tmp_path / "straight")
    model = pretrain(plan, store, tmp_path / "ckpt")[0]  # loads the final checkpoint
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_no_readable_checkpoint_names_every_file_and_never_advises_weights_only_false(
        store, tmp_path):
    plan, manager = _interrupted_run(store, tmp_path, stop_after=3)
    paths = manager.paths()
    assert len(paths) == 3
    for path in paths:
        _flip_pickle_bit(path)
        path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(CheckpointStateError) as caught:
        pretrain(plan, store, tmp_path, on_message=lambda line: None)
    message = str(caught.value)
    assert all(str(p) in message for p in paths)
    assert "weights_only" not in message and "\n" not in message


def test_digest_written_beside_each_checkpoint_and_pruned_with_it(store, tmp_path):
    _interrupted_run(store, tmp_path, stop_after=5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"step-0000000{i}.pt{suffix}" for i in (3, 4, 5)
                     for suffix in ("", ".sha256")]
    # A checkpoint written before digests existed loads unverified.
    (tmp_path / "step-00000005.pt.sha256").unlink()
    assert CheckpointManager.load(tmp_path / "step-00000005.pt").step == 5
