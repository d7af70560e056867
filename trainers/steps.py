"""The optimizer step every training loop takes: candidate training during the search
(``trainers.candidate``) and the long loop of pretraining and chat fine-tuning (``trainers.fit``).

``train_step`` sets the schedule's learning rate for the loop's ``progress``, clears the
gradients, runs forward and the recipe's loss over the step's micro-batches (gradient
accumulation; under DDP only the last one synchronises), backward, averages the loss over the
workers, raises ``NonFiniteLoss`` for a NaN or infinite loss before the weights change, clips the
gradient norm and steps the optimizer. The loops decide which steps to take, where the schedule
stands and what a step's batch is; the step itself draws no randomness but the model's (dropout),
so batches that are a pure function of (seed, step) keep a run reproducible.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainers.recipe import TrainHparams, autocast_for, learning_rate_at, lm_loss

Batch = tuple[torch.Tensor, torch.Tensor | None]  # tokens (B, T + 1), loss mask (B, T) or None


class NonFiniteLoss(FloatingPointError):
    """A step's loss was NaN or infinite; weights and optimizer state are as before the step."""

    def __init__(self, loss: float, step: int) -> None:
        super().__init__(f"training diverged: loss {loss} at step {step}")
        self.loss, self.step = loss, step


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's batch (all workers')
    learning_rate: float  # the rate the step was taken with


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               hparams: TrainHparams, *, progress: float, step: int, device: torch.device,
               grad_accum: int = 1, trained: torch.nn.Module | None = None,
               world: int = 1, learning_rate: float | None = None) -> StepResult:
    """One optimizer step on ``batch`` (this worker's share of step ``step``'s global batch),
    at ``progress`` in [0, 1] of the schedule. ``trained`` runs the forward pass when it is not
    ``model`` itself (compiled, or DDP-wrapped when ``world`` > 1); ``model``'s parameters are
    clipped. The batch's rows split into ``grad_accum`` equal micro-batches. ``learning_rate``
    replaces the schedule's rate (a plateau decay's, ``trainers.plateau``)."""
    lr = learning_rate_at(progress, hparams) if learning_rate is None else learning_rate
    set_learning_rate(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model if trained is None else trained, batch, hparams, device,
                                grad_accum=grad_accum, world=world)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(value, step)
    torch.nn.utils.clip_grad_norm_(model.parameters(), hparams.grad_clip)
    optimizer.step()
    return StepResult(value, lr)


def accumulate_gradients(model: torch.nn.Module, batch: Batch, hparams: TrainHparams,
                         device: torch.device, *, grad_accum: int = 1,
                         world: int = 1) -> torch.Tensor:
    """Forward and backward over ``grad_accum`` micro-batches of ``batch``, gradients summed to
    those of the mean loss; returns that mean loss (detached). With ``world`` > 1 ``model`` is
    DDP-wrapped and only the last micro-batch synchronises the gradients."""
    tokens, mask = batch
    rows = tokens.shape[0] // grad_accum
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        part = slice(micro * rows, (micro + 1) * rows)
        inputs = tokens[part].to(device)
        sync = world == 1 or micro == grad_accum - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast_for(device):
                logits, _ = model(inputs[:, :-1])
            loss = lm_loss(logits, inputs[:, 1:], None if mask is None else mask[part].to(device),
                           hparams.label_smoothing, hparams.z_loss)
            (loss / grad_accum).backward()
        total += loss.detach() / grad_accum
    return total


class Throughput:
    """Tokens trained per second over a stretch of training; ``restart`` leaves out what should
    not count (a checkpoint's write)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def per_second(self, seconds: float | None = None) -> float:
        return self.tokens / max(self.seconds if seconds is None else seconds, 1e-9)
