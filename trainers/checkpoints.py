"""Full training-state checkpoints of a long run (pretraining, fine-tuning).

One file per checkpoint, ``step-00001200.pt``, holding everything needed to continue exactly:
model weights, optimizer moments, the step (which is also the learning-rate schedule's position
and the data position: batches are a pure function of (seed, step)), the RNG states and the
run's history so far. Each file is written under a temporary name and renamed into place, so a
write killed midway leaves only a stray temporary file and every earlier checkpoint intact; the
last ``keep`` are kept. Loading uses ``weights_only=True``: tensors and plain data, no pickled
code.

Beside each checkpoint, ``step-00001200.pt.sha256`` holds its SHA-256 (``sha256sum -c`` reads
it): torch does not check the tensor bytes of a file it loads, so a flipped bit in the weights
would otherwise resume silently with damaged weights. ``load_latest`` tries the newest readable
checkpoint first and falls back to the older ones kept (a disk fault, a copy cut short), so one
bad file costs only the steps since the one before it. Files without a digest (written by an
older version, or by a process killed between the two renames) are loaded unverified: a renamed
checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.checkpoint import atomic_write

_NAME = re.compile(r"^step-(\d{8})\.pt$")
DIGEST_SUFFIX = ".sha256"


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


def cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU (what a checkpoint or a kept best holds)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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
        digest = _digest_path(path)
        # A re-save of the same step (a resumed run's final checkpoint) must never leave the old
        # digest beside the new file: drop it first; a kill before the new one is written leaves
        # a complete checkpoint without a digest, which loads unverified.
        digest.unlink(missing_ok=True)
        hashed: list[str] = []

        def write(tmp: str) -> None:
            torch.save(state.to_dict(), tmp)
            hashed.append(_sha256(tmp))

        atomic_write(path, write)
        atomic_write(digest, lambda tmp: Path(tmp).write_text(f"{hashed[0]}  {path.name}\n"))
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
            _digest_path(old).unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def load_latest(self, warn: Callable[[str], None] | None = None
                    ) -> tuple[Path, RunState] | None:
        """The newest checkpoint that can be read, and its path; None when there is none.
        Each unreadable newer one is reported to ``warn`` (one line naming the file) and
        skipped. Raises ``CheckpointStateError`` naming every file when none is readable."""
        paths = self.paths()
        errors = []
        for path in reversed(paths):
            try:
                return path, self.load(path)
            except CheckpointStateError as err:
                errors.append(str(err))
                if warn is not None and path != paths[0]:
                    warn(f"{err}; trying the one before")
        if errors:
            raise CheckpointStateError(
                f"{self.directory}: no readable checkpoint ({'; '.join(errors)}); move it aside "
                f"to train from the start")
        return None

    @staticmethod
    def load(path: str | Path) -> RunState:
        path = Path(path)
        digest = _digest_path(path)
        try:
            expected = digest.read_text().split()[0] if digest.is_file() else None
        except (OSError, IndexError):
            expected = None  # an empty or unreadable digest says nothing either way
        if expected is not None:
            try:
                actual = _sha256(path)
            except OSError as err:
                raise CheckpointStateError(f"{path}: not a readable checkpoint: "
                                           f"{type(err).__name__}: {err}") from None
            if actual != expected:
                raise CheckpointStateError(f"{path}: not a readable checkpoint: its contents "
                                           f"do not match {digest.name} (corrupted)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return RunState(**data)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise CheckpointStateError(f"{path}: not a readable checkpoint: "
                                       f"{_reason(err, path)}") from None


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _sha256(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _reason(err: Exception, path: Path) -> str:
    """Why torch could not load a file, in one line, without its advice to retry with
    ``weights_only=False``: that would unpickle arbitrary code from a file that is damaged or
    not ours, and a damaged checkpoint does not load either way."""
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text:
        # torch puts the unpickler's actual complaint after "WeightsUnpickler error:", then
        # more advice ("Check the documentation ...").
        _, _, detail = text.partition("WeightsUnpickler error:")
        detail = " ".join(detail.split("Check the documentation")[0].split())
        if "weights_only" in detail:
            detail = ""
        return "its contents are damaged or are not a checkpoint (unpickling failed" + (
            f": {detail})" if detail else ")")
    if isinstance(err, OSError) and path.is_file():
        # A file cut short makes torch's zip reader fail with a bare errno text.
        return f"truncated or damaged ({err.strerror or text})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
