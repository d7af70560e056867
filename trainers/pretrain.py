"""Full pretraining of one architecture on a token store.

Packed sequences: every batch is ``batch_size`` windows of ``seq_len + 1`` tokens cut from the
split's document stream (documents joined by the end-of-text token), drawn from (seed, step), so
the data position of a checkpoint is just its step. The loop itself is ``trainers.fit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.config import ChimeraConfig
from chimera.model import Chimera
from trainers.fit import Batch, FitResult, FitSettings, StepReport, fit
from trainers.recipe import TrainHparams, make_optimizer
from trainers.steps import Throughput, train_step
from trainers.store import TokenStore


class StoreBatches:
    """Packed windows of a token store: training batches by step, the fixed validation set."""

    def __init__(self, store: TokenStore, hparams: TrainHparams, seed: int) -> None:
        self.store, self.hparams, self.seed = store, hparams, seed

    def batch(self, step: int) -> Batch:
        return self.store.sample("train", self.hparams.batch_size, self.hparams.seq_len,
                                 self.seed, step), None

    def validation(self) -> list[Batch]:
        return [(b, None) for b in self.store.validation_batches(
            self.hparams.batch_size, self.hparams.seq_len, self.hparams.eval_batches)]


@dataclass(frozen=True)
class PretrainPlan:
    """Everything that defines a pretraining run (a checkpoint resumes only the same plan)."""

    config: ChimeraConfig
    hparams: TrainHparams
    fit: FitSettings
    seed: int = 0

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "hparams": dataclasses.asdict(self.hparams),
                "fit": dataclasses.asdict(self.fit), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> PretrainPlan:
        return cls(ChimeraConfig.from_dict(data["config"]),
                   TrainHparams.from_dict(data["hparams"]), FitSettings(**data["fit"]),
                   data["seed"])

    @property
    def tokens(self) -> int:
        return self.fit.steps * self.hparams.batch_size * self.hparams.seq_len


def steps_for_tokens(tokens: int, hparams: TrainHparams) -> int:
    return max(1, tokens // (hparams.batch_size * hparams.seq_len))


def pretrain(plan: PretrainPlan, store: TokenStore, checkpoint_dir: str | Path | None = None,
             *, device: str | torch.device = "cpu",
             on_step: Callable[[StepReport], None] | None = None,
             sampler: Callable[[torch.nn.Module], str] | None = None,
             stop_after: int | None = None,
             on_message: Callable[[str], None] | None = None) -> tuple[Chimera, FitResult]:
    """Build the model from the plan's seed and train it; resumes from ``checkpoint_dir`` (the
    newest readable checkpoint; ``on_message`` hears which, and of any skipped)."""
    if plan.config.vocab_size < store.vocab_size:
        raise ValueError(f"the model's vocab_size {plan.config.vocab_size} is smaller than the "
                         f"store's {store.vocab_size}")
    if plan.hparams.seq_len > plan.config.max_seq_len:
        raise ValueError(f"seq_len {plan.hparams.seq_len} exceeds the model's max_seq_len "
                         f"{plan.config.max_seq_len}")
    torch.manual_seed(plan.seed)
    model = Chimera(plan.config).to(device)
    result = fit(model, plan.hparams, StoreBatches(store, plan.hparams, plan.seed), plan.fit,
                 checkpoint_dir, device=device, meta=plan.to_dict(), on_step=on_step,
                 sampler=sampler, stop_after=stop_after, on_message=on_message)
    return model, result


def measure_tokens_per_second(config: ChimeraConfig, hparams: TrainHparams, store: TokenStore,
                              *, device: str | torch.device = "cpu", steps: int = 8,
                              warmup: int = 3) -> float:
    """This machine's training speed for ``config`` with ``hparams``' batch: ``steps`` timed
    optimizer steps after ``warmup`` untimed ones (first-step allocations, kernel loads), on a
    throwaway copy of the model, so the stages of a budget can be sized in tokens."""
    torch.manual_seed(0)
    model = Chimera(config).to(device)
    optimizer = make_optimizer(model, hparams)
    batches = StoreBatches(store, hparams, seed=0)
    throughput = Throughput()
    for step in range(warmup + steps):
        if step == warmup:
            throughput.restart()
        train_step(model, optimizer, batches.batch(step), hparams, progress=0.0, step=step,
                   device=torch.device(device))
        if step >= warmup:
            throughput.add(hparams.batch_size * hparams.seq_len)
    return throughput.per_second()
