"""Full training-state checkpoints of a long run (pretraining, fine-tuning).

One file per checkpoint, ``step-00001200.pt``, holding everything needed to continue exactly:
model weights, optimizer moments, the step (which is also the learning-rate schedule's position
and the data position: batches are a pure function of (seed, step)), the RNG states and the
run's history so far. Each file is written under a temporary name and renamed into place, so a
write killed midway leaves only a stray temporary file and every earlier checkpoint intact; the
last ``keep`` are kept. Loading uses ``weights_only=True``: tensors and plain data, no pickled
code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.checkpoint import atomic_write

_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointStateError(ValueError):
    """A checkpoint that cannot be read, or does not belong to the run resuming from it."""


@dataclass
class RunState:
    """What a checkpoint holds."""

    model: dict
    optimizer: dict
    step: int
    rng: dict  # "torch": CPU generator state; "cuda": per-device states (or absent)
    history: dict  # curves and samples so far (plain data)
    meta: dict  # what the run was (config, settings); checked on resume

    def to_dict(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "step": self.step,
                "rng": self.rng, "history": self.history, "meta": self.meta}


def capture_rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class CheckpointManager:
    """Write, list, prune and load the checkpoints in one directory."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files of interrupted writes excluded)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: RunState) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{state.step:08d}.pt"
        atomic_write(path, lambda tmp: torch.save(state.to_dict(), tmp))
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    @staticmethod
    def load(path: str | Path) -> RunState:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return RunState(**data)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise CheckpointStateError(f"{path}: not a readable checkpoint: "
                                       f"{type(err).__name__}: {err}") from None
