"""Saving and loading a model as a directory: ``model.safetensors`` plus ``config.json``.

Both files are written under temporary names and renamed into place, so an interrupted save
never leaves a half-written model. Loading never unpickles anything (safetensors), and checks
that the stored tensors are exactly the ones the stored (or expected) config builds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chimera.config import ChimeraConfig
from chimera.model import Chimera

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHIMERA_FIELDS = frozenset(f.name for f in dataclasses.fields(ChimeraConfig))
# What transformers needs in config.json to pick the class (chimera.hf registers it), and the
# prefix its wrapper gives the weights (save_pretrained writes "model.embed.weight").
HF_MODEL_TYPE = "chimera"
HF_ARCHITECTURE = "ChimeraForCausalLM"
HF_WEIGHT_PREFIX = "model."


class CheckpointError(ValueError):
    """A model directory that is missing, incomplete or does not match its config."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place:
    readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: Chimera, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE,
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config_json = json.dumps({**model.config.to_dict(), "model_type": HF_MODEL_TYPE,
                              "architectures": [HF_ARCHITECTURE]}, indent=2, sort_keys=True)
    config_json += "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_json))
    return directory


def load_config(directory: str | Path) -> ChimeraConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; is {directory} a Chimera model directory?")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.pop("model_type", None) == HF_MODEL_TYPE:
            # Written by save_model or by transformers' save_pretrained, which adds its own
            # keys (transformers_version, dtype...): the genes are what makes the model.
            data = {k: v for k, v in data.items() if k in CHIMERA_FIELDS}
        return ChimeraConfig.from_dict(data)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid Chimera config: {err}") from None


def load_model(directory: str | Path, expected_config: ChimeraConfig | None = None,
               device: str | torch.device = "cpu") -> Chimera:
    """Load a model directory. With ``expected_config``, refuse a directory whose config differs."""
    directory = Path(directory)
    config = load_config(directory)
    if expected_config is not None and expected_config != config:
        diffs = [f"{k}: stored {v!r} vs expected {expected_config.to_dict()[k]!r}"
                 for k, v in config.to_dict().items() if expected_config.to_dict()[k] != v]
        raise CheckpointError(f"{directory}: config does not match: {'; '.join(diffs)}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such file")
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file: {err}") from None
    if state and all(name.startswith(HF_WEIGHT_PREFIX) for name in state):  # save_pretrained's
        state = {name.removeprefix(HF_WEIGHT_PREFIX): t for name, t in state.items()}

    model = Chimera(config).to(device)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in state.items()}
    if expected != stored:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        wrong = sorted(n for n in set(expected) & set(stored) if expected[n] != stored[n])
        raise CheckpointError(
            f"{weights_path}: weights do not match {CONFIG_FILE}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shape "
            f"{[(n, stored[n], expected[n]) for n in wrong[:5]]}")
    model.load_state_dict(state)
    return model
