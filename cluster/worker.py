"""What a worker does with a genome: build its config, train it, return plain data.

``CandidateTrainer`` is used as is by the in-process evaluator, and wrapped in a Ray actor by
``cluster.evaluator``; either way one trainer opens the token store once (memory-mapped) and is
reused for every candidate it trains.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from search.genome import Genome
from trainers.candidate import TrainBudget, TrainHparams, train_candidate
from trainers.store import TokenStore


@dataclass(frozen=True)
class CandidateSettings:
    """How every candidate of a run trains: the same data, budget, hyperparameters and seed."""

    store_dir: str
    budget: TrainBudget
    hparams: TrainHparams
    seed: int
    threads: int = 1  # torch threads: the CPUs the worker was given
    device: str = "cpu"


class CandidateTrainer:
    def __init__(self, settings: CandidateSettings, name: str = "worker") -> None:
        self.settings = settings
        self.name = f"{name}@{socket.gethostname()}"
        # The driver verified the store's checksum; workers only check its layout.
        self.store = TokenStore.open(settings.store_dir, verify=False)
        torch.set_num_threads(max(1, settings.threads))

    def train(self, genome: dict) -> dict:
        config = Genome.from_dict(genome).to_config(self.store.vocab_size,
                                                    self.settings.hparams.seq_len)
        result = train_candidate(config, self.store, self.settings.budget, self.settings.hparams,
                                 self.settings.seed, self.settings.device)
        data = result.to_dict()
        data["worker"] = self.name
        return data
