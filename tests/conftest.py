"""Shared fixtures: tiny configs so the whole suite runs in seconds on two CPU cores."""

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
