"""Shared fixtures: tiny configs so the whole suite runs in seconds on two CPU cores."""

from pathlib import Path

import pytest
import torch

from chimera.config import ChimeraConfig


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config() -> ChimeraConfig:
    return ChimeraConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_multiplier=2.0, recurrence_ratio=2, window_size=8, max_seq_len=128)


@pytest.fixture(scope="session")
def make_model_dir():
    """``make(directory, tokenizer, max_seq_len)``: a model directory (random weights, the
    tokenizer's vocabulary) as ``chimera train`` writes one, for commands that load a model."""
    from chimera.checkpoint import save_model
    from chimera.inference import TOKENIZER_DIR
    from chimera.model import Chimera

    def make(directory, tokenizer, max_seq_len: int = 64):
        torch.manual_seed(0)
        config = ChimeraConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2,
                               n_kv_heads=1, window_size=32, max_seq_len=max_seq_len)
        save_model(Chimera(config), directory)
        tokenizer.save_pretrained(str(Path(directory) / TOKENIZER_DIR))
        return directory

    return make


@pytest.fixture
def no_network(monkeypatch):
    """Any connection beyond this machine fails the test: nothing may download anything."""
    import socket

    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
            return real_connect(sock, address)
        raise AssertionError(f"a test tried to reach {address}: nothing may use the network")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
