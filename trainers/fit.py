"""The long training loop shared by pretraining and chat fine-tuning.

``fit`` trains a model for a number of optimizer steps on batches from a ``BatchSource``:
gradient accumulation, the recipe's schedule, clipping, bf16 autocast on CUDA, optional
``torch.compile``, periodic evaluation and samples, full-state checkpoints that resume exactly,
and a Ctrl+C that saves before it stops.

Data-parallel: when ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does it on
every worker), each rank takes its slice of the same global batch and DDP averages the gradients,
so N workers follow the trajectory of one worker with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from trainers.checkpoints import (
    CheckpointManager,
    CheckpointStateError,
    RunState,
    capture_rng,
    restore_rng,
)
from trainers.recipe import (
    TrainHparams,
    autocast_for,
    evaluate,
    learning_rate_at,
    lm_loss,
    make_optimizer,
)

Batch = tuple[torch.Tensor, torch.Tensor | None]  # tokens (B, T + 1), loss mask (B, T) or None


class BatchSource(Protocol):
    def batch(self, step: int) -> Batch:
        """The global batch of optimizer step ``step``: a pure function of the step, so a
        resumed run sees exactly the batches an uninterrupted one would."""

    def validation(self) -> list[Batch]:
        """The fixed validation batches."""


@dataclass(frozen=True)
class FitSettings:
    steps: int
    grad_accum: int = 1  # micro-batches per optimizer step (per worker)
    eval_every: int = 0  # 0: evaluate only at the end
    sample_every: int = 0  # 0: sample only at the end (when a sampler is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end and on Ctrl+C
    keep_checkpoints: int = 3
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {self.grad_accum}")


@dataclass
class History:
    """The run's curves, kept in checkpoints so a resumed run reports the whole run."""

    train: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, lr
    val: list[tuple[int, float]] = field(default_factory=list)  # step, loss (nats/token)
    samples: list[tuple[int, str]] = field(default_factory=list)
    tokens: int = 0  # tokens trained on
    seconds: float = 0.0  # training time, summed over resumed segments

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(train=[tuple(x) for x in data["train"]], val=[tuple(x) for x in data["val"]],
                   samples=[tuple(x) for x in data["samples"]], tokens=data["tokens"],
                   seconds=data["seconds"])


@dataclass
class FitResult:
    step: int
    history: History
    interrupted: bool = False
    checkpoint: Path | None = None

    @property
    def val_loss(self) -> float | None:
        return self.history.val[-1][1] if self.history.val else None


@dataclass(frozen=True)
class StepReport:
    """What ``on_step`` receives after each optimizer step (rank 0 only)."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens: int
    tokens_per_second: float
    val_loss: float | None = None  # set on evaluation steps


class _StopRequest:
    """The first SIGINT asks the loop to stop after the current step (and save); a second one
    interrupts at once. Only the main thread can own signal handlers; elsewhere it is inert."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(model: torch.nn.Module, hparams: TrainHparams, source: BatchSource,
        settings: FitSettings, checkpoint_dir: str | Path | None = None,
        device: str | torch.device = "cpu", meta: dict | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        sampler: Callable[[torch.nn.Module], str] | None = None,
        stop_after: int | None = None,
        on_message: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model`` (already on ``device``) for ``settings.steps`` optimizer steps.

    With ``checkpoint_dir`` holding checkpoints, training resumes from the newest readable one
    (whose ``meta`` must equal this run's); an unreadable newer one is skipped with a warning.
    ``stop_after``: stop (and checkpoint) once this step is reached, as an interruption would.
    ``sampler(model) -> text`` makes sample generations. ``on_message(line)`` receives the
    resume notices (rank 0 only; default: stderr)."""
    device = torch.device(device)
    rank, world = _distributed()
    meta = meta or {}
    manager = CheckpointManager(checkpoint_dir, settings.keep_checkpoints) \
        if checkpoint_dir is not None else None
    optimizer = make_optimizer(model, hparams)
    history, step = History(), 0

    def tell(line: str) -> None:
        if rank == 0:
            (on_message or _to_stderr)(line)

    found = manager.load_latest(warn=lambda line: tell(f"warning: {line}")) if manager else None
    if found is not None:
        latest, state = found
        if state.meta != meta:
            raise CheckpointStateError(
                f"{latest}: belongs to another run ({_first_difference(state.meta, meta)}); "
                f"use another output directory or remove its checkpoints")
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        restore_rng(state.rng)
        history, step = History.from_dict(state.history), state.step
        tell(f"resuming from {latest} (step {step} of {settings.steps})")

    micro_rows = _micro_batch_rows(hparams.batch_size, world, settings.grad_accum)
    trained = model
    if settings.compile:
        trained = torch.compile(model)
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained)
    validation = source.validation()
    stop = _StopRequest()

    def save() -> Path | None:
        if manager is None or rank != 0:
            return None
        return manager.save(RunState(
            model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            optimizer=optimizer.state_dict(), step=step, rng=capture_rng(),
            history=history.to_dict(), meta=meta))

    def run_evaluation() -> float:
        val_loss = evaluate(model, validation, device)
        history.val.append((step, val_loss))
        if sampler is not None and rank == 0:
            history.samples.append((step, sampler(model)))
        return val_loss

    interrupted, checkpoint = False, None
    with stop.installed():
        segment_start, segment_tokens = time.perf_counter(), 0
        while step < settings.steps:
            lr = learning_rate_at(step / settings.steps, hparams)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, mask = source.batch(step)
            mine = slice(rank * micro_rows * settings.grad_accum,
                         (rank + 1) * micro_rows * settings.grad_accum)
            tokens, mask = tokens[mine], None if mask is None else mask[mine]
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(settings.grad_accum):
                rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
                batch = tokens[rows].to(device)
                sync = world == 1 or micro == settings.grad_accum - 1
                with (contextlib.nullcontext() if sync else trained.no_sync()):
                    with autocast_for(device):
                        logits, _ = trained(batch[:, :-1])
                    loss = lm_loss(logits, batch[:, 1:],
                                   None if mask is None else mask[rows].to(device),
                                   hparams.label_smoothing, hparams.z_loss)
                    (loss / settings.grad_accum).backward()
                step_loss += loss.detach() / settings.grad_accum
            if world > 1:
                dist.all_reduce(step_loss)
                step_loss /= world
            loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged: loss {loss_value} at step {step}")
            torch.nn.utils.clip_grad_norm_(model.parameters(), hparams.grad_clip)
            optimizer.step()
            step += 1
            step_tokens = hparams.batch_size * hparams.seq_len
            history.tokens += step_tokens
            segment_tokens += step_tokens
            history.train.append((step, loss_value, lr))
            val_loss = None
            if settings.eval_every and step % settings.eval_every == 0 \
                    and step < settings.steps:
                val_loss = run_evaluation()
            elapsed = time.perf_counter() - segment_start
            if on_step is not None and rank == 0:
                on_step(StepReport(step, settings.steps, loss_value, lr, history.tokens,
                                   segment_tokens / max(elapsed, 1e-9), val_loss))
            stopping = stop.requested or (stop_after is not None and step >= stop_after)
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 \
                    and step < settings.steps and not stopping:
                history.seconds += time.perf_counter() - segment_start
                checkpoint = save()
                segment_start, segment_tokens = time.perf_counter(), 0
            if stopping:
                interrupted = True
                break
        history.seconds += time.perf_counter() - segment_start
        if not interrupted and (not history.val or history.val[-1][0] != step):
            val_loss = run_evaluation()
            if on_step is not None and rank == 0:
                on_step(StepReport(step, settings.steps, history.train[-1][1],
                                   history.train[-1][2], history.tokens, 0.0, val_loss))
        checkpoint = save() or checkpoint
    return FitResult(step, history, interrupted, checkpoint)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _micro_batch_rows(batch_size: int, world: int, grad_accum: int) -> int:
    parts = world * grad_accum
    if batch_size % parts:
        raise ValueError(f"batch_size {batch_size} does not split over {world} worker(s) x "
                         f"{grad_accum} accumulation step(s); use a multiple of {parts}")
    return batch_size // parts


def _first_difference(stored: dict, current: dict) -> str:
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            return f"{key}: {stored.get(key)!r} there, {current.get(key)!r} here"
    return "no difference"
