"""What a worker does with a genome: build its config, train it, return plain data.

``CandidateTrainer`` is used as is by the in-process evaluator, and wrapped in a Ray actor by
``cluster.ray.evaluator``; either way one trainer opens the token store once (memory-mapped) and is
reused for every candidate it trains. As a Ray actor it runs two threads: one trains, the other
answers heartbeats with the time since training last made progress.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.checkpoint import atomic_write
from cluster.ray.node_store import Origin, StoreSource, open_on_node
from search.genome import Genome
from trainers.candidate import (
    BudgetKind,
    Status,
    TrainBudget,
    TrainHparams,
    TrainingState,
    estimate_training_memory,
    train_candidate,
)
from trainers.store import TokenStore


@dataclass(frozen=True)
class CandidateSettings:
    """How every candidate of a run trains: the same data, budget, hyperparameters and seed."""

    store_dir: str
    budget: TrainBudget
    hparams: TrainHparams
    seed: int
    vocab_size: int
    threads: int = 1  # torch threads: the CPUs the worker was given
    device: str = "cpu"
    # Hurdles: the total steps at the end of each rung, and where a candidate's training state
    # waits between rungs (a directory every worker can reach). Empty: one budget, no rungs.
    rung_steps: tuple[int, ...] = ()
    checkpoint_dir: str | None = None

    def checkpoint_path(self, candidate_id: int) -> Path:
        return Path(self.checkpoint_dir or ".") / f"candidate-{candidate_id}.pt"


@dataclass(frozen=True)
class FaultPolicy:
    """How the Ray evaluator treats lost and hung workers (see ``cluster.ray.evaluator``)."""

    max_attempts: int = 3  # runs of one candidate: the first and up to two retries
    heartbeat_seconds: float = 10.0  # how often a busy worker is asked for a heartbeat
    hang_seconds: float = 300.0  # no heartbeat, or no training progress, for this long: hung
    start_seconds: float = 600.0  # a worker not running by then is given up

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 < self.heartbeat_seconds < self.hang_seconds:
            raise ValueError("heartbeat_seconds must be positive and below hang_seconds")


def memory_needed(genome: Genome, settings: CandidateSettings) -> int:
    config = genome.to_config(settings.vocab_size, settings.hparams.seq_len)
    return estimate_training_memory(config, settings.hparams)


def memory_rejection(genome: Genome, settings: CandidateSettings, available: int,
                     where: str) -> str | None:
    """Why ``genome`` cannot train within ``available`` bytes, or None if it can."""
    needed = memory_needed(genome, settings)
    if needed <= available:
        return None
    hp = settings.hparams
    return (f"needs ~{needed / 2**30:.2f} GiB to train (weights, gradients, AdamW state and "
            f"activations at batch {hp.batch_size} x {hp.seq_len} tokens); {where} offers "
            f"{available / 2**30:.2f} GiB")


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ray_node_id() -> str:
    """The Ray node this process runs on, or "" outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _ray_gpu_ids() -> list:
    """The GPUs Ray gave this worker (what its CUDA_VISIBLE_DEVICES holds)."""
    import ray

    return [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []


class CandidateTrainer:
    def __init__(self, settings: CandidateSettings, name: str = "worker",
                 store: StoreSource | None = None) -> None:
        self.settings = settings
        self.name = f"{name}@{socket.gethostname()}"
        self.node_id = _ray_node_id()
        if store is None:  # the driver's own directory, read in place
            self.store = TokenStore.open(settings.store_dir, verify=False)
            self.store_origin, self.store_path = Origin.SHARED, settings.store_dir
        else:
            self.store, self.store_origin, path = open_on_node(store, self.node_id)
            self.store_path = str(path)
        torch.set_num_threads(max(1, settings.threads))
        self.last_progress: float | None = None  # None: not training

    def describe(self) -> dict:
        """Where this worker runs and how it got the store (answers once it has started)."""
        info = {"name": self.name, "pid": os.getpid(), "node_id": self.node_id,
                "store_origin": self.store_origin.value, "store_path": self.store_path,
                "gpu_ids": _ray_gpu_ids()}
        if self.settings.device == "cuda" and torch.cuda.is_available():
            info["device_memory"] = torch.cuda.get_device_properties(0).total_memory
        return info

    def store_memory(self, touch: bool = True) -> dict[str, int]:
        """Resident bytes of the token store's files in this process, from /proc/self/smaps:
        ``rss`` counts every page it maps, ``pss`` its proportional share (a page that k
        processes share counts 1/k). ``touch`` first reads every page, as training does in time.
        """
        if touch:
            for split in ("train", "val"):
                tokens = self.store.tokens(split)
                int(tokens[:: max(1, 4096 // tokens.itemsize)].sum())
        totals = {"rss": 0, "pss": 0}
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if head and not head[0].endswith(":"):  # a mapping's header: range perms ... path
                inside = len(head) >= 6 and head[5].startswith(str(self.store_path))
            elif inside and head[0] in ("Rss:", "Pss:"):
                totals[head[0][:-1].lower()] += int(head[1]) * 1024
        return totals

    def heartbeat(self) -> float | None:
        """Seconds since training last made progress; None when idle."""
        last = self.last_progress
        return None if last is None else time.monotonic() - last

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    def train(self, genome: dict, candidate_id: int = 0, rung: int = 0) -> dict:
        """Train a candidate; with hurdles, to the end of ``rung``, continuing from the state
        the previous rung left in the checkpoint directory."""
        self._progress()
        settings = self.settings
        try:
            config = Genome.from_dict(genome).to_config(self.store.vocab_size,
                                                        settings.hparams.seq_len)
            if not settings.rung_steps:
                result = train_candidate(config, self.store, settings.budget, settings.hparams,
                                         seed=settings.seed, device=settings.device,
                                         on_progress=self._progress)
            else:
                result = self._train_rung(config, candidate_id, rung)
        finally:
            self.last_progress = None
        data = result.to_dict()
        data["worker"], data["node_id"] = self.name, self.node_id
        return data

    def _train_rung(self, config, candidate_id: int, rung: int):
        settings, path = self.settings, self.settings.checkpoint_path(candidate_id)
        last = rung == len(settings.rung_steps) - 1
        resume = TrainingState.from_bytes(path.read_bytes()) if rung > 0 else None
        result = train_candidate(
            config, self.store, TrainBudget(BudgetKind.STEPS, settings.rung_steps[rung]),
            settings.hparams, seed=settings.seed, device=settings.device,
            on_progress=self._progress,
            resume=resume, schedule_steps=settings.rung_steps[-1], keep_state=not last)
        if result.state is not None and result.status is Status.OK:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = result.state.to_bytes()
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        result.rung = rung
        return result
