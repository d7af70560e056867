"""Save/load: safetensors + config.json, round trip and refusal of mismatches."""

import dataclasses
import json

import pytest
import torch

from chimera.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_model, save_model
from chimera.model import Chimera


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_load_round_trips(tmp_path, tiny_config, tied):
    config = dataclasses.replace(tiny_config, tie_embeddings=tied)
    model = Chimera(config).eval()
    save_model(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(tmp_path / "model").eval()
    assert loaded.config == config
    tokens = torch.randint(0, config.vocab_size, (2, 20))
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_load_refuses_a_config_other_than_the_expected_one(tmp_path, tiny_config):
    save_model(Chimera(tiny_config), tmp_path)
    other = dataclasses.replace(tiny_config, window_size=16)
    with pytest.raises(CheckpointError, match="window_size: stored 8 vs expected 16"):
        load_model(tmp_path, expected_config=other)


def test_load_refuses_weights_that_do_not_match_the_config(tmp_path, tiny_config):
    save_model(Chimera(tiny_config), tmp_path)
    edited = json.loads((tmp_path / CONFIG_FILE).read_text())
    edited["d_model"] = 64
    (tmp_path / CONFIG_FILE).write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(tmp_path)


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent")
    save_model(Chimera(tiny_config), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{broken")
    with pytest.raises(CheckpointError, match="not a valid Chimera config"):
        load_model(tmp_path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny_config, monkeypatch):
    model = Chimera(tiny_config)
    save_model(model, tmp_path)
    before = (tmp_path / WEIGHTS_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("chimera.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(Chimera(tiny_config), tmp_path)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
