"""The long training loop shared by pretraining and chat fine-tuning.

``fit`` trains a model for a number of optimizer steps on batches from a ``BatchSource``:
the optimizer step of ``trainers.steps`` (gradient accumulation, the recipe's schedule,
clipping, bf16 autocast on CUDA), optional ``torch.compile``, periodic evaluation and samples,
full-state checkpoints that resume exactly, and a Ctrl+C that saves before it stops.

Data-parallel: when ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does it on
every worker), each rank takes its slice of the same global batch and DDP averages the gradients,
so N workers follow the trajectory of one worker with the same global batch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
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
    cpu_weights,
    restore_rng,
)
from trainers.plateau import PlateauDecay
from trainers.recipe import TrainHparams, evaluate, make_optimizer
from trainers.steps import Batch, StepResult, Throughput, train_step


class BatchSource(Protocol):
    def batch(self, step: int) -> Batch:
        """The global batch of optimizer step ``step``: a pure function of the step, so a
        resumed run sees exactly the batches an uninterrupted one would."""

    def validation(self) -> list[Batch]:
        """The fixed validation batches."""


@dataclass(frozen=True)
class FitSettings:
    steps: int  # at most this many optimizer steps (with ``seconds``: a cap, and the cadence's)
    grad_accum: int = 1  # micro-batches per optimizer step (per worker)
    eval_every: int = 0  # 0: evaluate only at the end
    sample_every: int = 0  # 0: sample only at the end (when a sampler is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end and on Ctrl+C
    keep_checkpoints: int = 3
    compile: bool = False
    # End with the weights of the evaluation with the lowest validation loss, not the last
    # step's: on a corpus a budget sees many times over, the last epochs overfit, and the model
    # the user keeps is the best one (early stopping, as a careful user of any recipe does).
    keep_best: bool = False
    # A wall clock instead of a step count: training stops once this many seconds of it are
    # spent (evaluations included; summed over resumed segments) and the learning-rate schedule
    # follows the clock, so a stage given N seconds uses them whatever the machine's speed (a
    # plan's speed measured on a few steps was 0.8-1.3x the loop's). ``steps`` then caps it,
    # and ``eval_every``/``checkpoint_every`` count steps as before.
    seconds: float | None = None
    # With keep_best: after this many evaluations without a new best, go back to the evaluation
    # before the best, train that stretch again with the rate decaying to the floor, and stop
    # (``trainers.plateau``); 0: off.
    plateau_patience: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {self.grad_accum}")
        if self.plateau_patience and not (self.keep_best and self.eval_every):
            raise ValueError("plateau_patience needs keep_best and eval_every: the decay is "
                             "timed by the evaluations, and may not beat the best one")


@dataclass
class History:
    """The run's curves, kept in checkpoints so a resumed run reports the whole run."""

    train: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, lr
    val: list[tuple[int, float]] = field(default_factory=list)  # step, loss (nats/token)
    samples: list[tuple[int, str]] = field(default_factory=list)
    tokens: int = 0  # tokens trained on
    seconds: float = 0.0  # training time, summed over resumed segments
    best_step: int | None = None  # with keep_best: the evaluation whose weights were kept
    plateau: dict | None = None  # with plateau_patience: the PlateauDecay's state

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(train=[tuple(x) for x in data["train"]], val=[tuple(x) for x in data["val"]],
                   samples=[tuple(x) for x in data["samples"]], tokens=data["tokens"],
                   seconds=data["seconds"], best_step=data.get("best_step"),
                   plateau=data.get("plateau"))


@dataclass
class FitResult:
    step: int
    history: History
    interrupted: bool = False
    checkpoint: Path | None = None

    @property
    def val_loss(self) -> float | None:
        """The validation loss of the weights the model ends with: the kept best evaluation's
        (``FitSettings.keep_best``), else the last one's."""
        history = self.history
        if history.best_step is not None:
            return next(loss for step, loss in history.val if step == history.best_step)
        return history.val[-1][1] if history.val else None


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
        settings: FitSettings, checkpoint_dir: str | Path | None = None, *,
        device: str | torch.device = "cpu", meta: dict | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        sampler: Callable[[torch.nn.Module], str] | None = None,
        stop_after: int | None = None,
        on_message: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model`` (already on ``device``) for ``settings.steps`` optimizer steps (or
    ``settings.seconds`` of wall clock, at most that many steps).

    With ``checkpoint_dir`` holding checkpoints, training resumes from the newest readable one
    (whose ``meta`` must equal this run's); an unreadable newer one is skipped with a warning.
    ``stop_after``: stop (and checkpoint) once this step is reached, as an interruption would.
    ``sampler(model) -> text`` makes sample generations. ``on_message(line)`` receives the
    resume notices (rank 0 only; default: stderr)."""
    run = _Run(model, hparams, settings, torch.device(device), meta or {}, checkpoint_dir)
    run.resume(on_message or _to_stderr)
    run.prepare(source, on_step, sampler)
    return run.train(source, stop_after)


class _Run:
    """One call of ``fit``: the model and its optimizer, where training stands (step and
    history), and what the loop reports to and saves into."""

    def __init__(self, model: torch.nn.Module, hparams: TrainHparams, settings: FitSettings,
                 device: torch.device, meta: dict, checkpoint_dir: str | Path | None) -> None:
        self.model, self.hparams, self.settings, self.device = model, hparams, settings, device
        self.rank, self.world = _distributed()
        self.meta = meta
        self.manager = CheckpointManager(checkpoint_dir, settings.keep_checkpoints) \
            if checkpoint_dir is not None else None
        self.optimizer = make_optimizer(model, hparams)
        self.history, self.step = History(), 0
        self.trained = model  # what runs forward: the model, compiled and/or DDP-wrapped
        self.share_rows = 0  # this worker's rows of each global batch
        self.validation: list[Batch] = []
        self.on_step: Callable[[StepReport], None] | None = None
        self.sampler: Callable[[torch.nn.Module], str] | None = None
        self.best: tuple[float, dict] | None = None  # keep_best: (val loss, weights on the CPU)
        self.segment = Throughput()  # this call's stretch of training (its clock)
        self.plateau = PlateauDecay(settings.plateau_patience) if settings.plateau_patience \
            else None
        self.on_message: Callable[[str], None] = _to_stderr

    def resume(self, on_message: Callable[[str], None]) -> None:
        """Continue from the newest readable checkpoint, if there is one (of this run only)."""
        self.on_message = on_message
        tell = self._tell
        manager, settings = self.manager, self.settings
        found = manager.load_latest(warn=lambda line: tell(f"warning: {line}")) \
            if manager else None
        if found is None:
            return
        latest, state = found
        if state.meta != self.meta:
            raise CheckpointStateError(
                f"{latest}: belongs to another run ({_first_difference(state.meta, self.meta)}); "
                f"use another output directory or remove its checkpoints")
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        restore_rng(state.rng)
        self.history, self.step = History.from_dict(state.history), state.step
        if self.plateau is not None and self.history.plateau is not None:
            self.plateau = PlateauDecay.from_dict(self.history.plateau)
        tell(f"resuming from {latest} (step {self.step} of {settings.steps})")

    def prepare(self, source: BatchSource, on_step: Callable[[StepReport], None] | None,
                sampler: Callable[[torch.nn.Module], str] | None) -> None:
        """Check the batch splits over the workers and micro-batches, wrap the model (compile,
        DDP) and fetch the validation batches."""
        settings = self.settings
        micro_rows = _micro_batch_rows(self.hparams.batch_size, self.world, settings.grad_accum)
        self.share_rows = micro_rows * settings.grad_accum
        if settings.compile:
            self.trained = torch.compile(self.model)
        if self.world > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(self.trained)
        self.validation = source.validation()
        self.on_step, self.sampler = on_step, sampler

    def train(self, source: BatchSource, stop_after: int | None) -> FitResult:
        """Steps until the end, a Ctrl+C or ``stop_after``; evaluations and checkpoints at their
        cadence, and at the end (a final evaluation only where the last step had none)."""
        settings, history = self.settings, self.history
        interrupted, checkpoint = False, None
        with _StopRequest().installed() as stop:
            throughput = Throughput()
            self.segment = throughput
            progress = self._progress()
            while not self._finished(progress):
                taken = self._take_step(source, progress)
                throughput.add(self.hparams.batch_size * self.hparams.seq_len)
                progress = self._progress()
                last = self._finished(progress)
                val_loss = None
                if settings.eval_every and self.step % settings.eval_every == 0 and not last:
                    val_loss = self.evaluate()
                    self._watch_plateau(val_loss, progress)
                self._report(taken.loss, taken.learning_rate, throughput.per_second(), val_loss)
                stopping = stop.requested or (stop_after is not None and self.step >= stop_after)
                if settings.checkpoint_every and self.step % settings.checkpoint_every == 0 \
                        and not last and not stopping:
                    history.seconds += throughput.seconds
                    checkpoint = self.save()
                    throughput.restart()
                if stopping:
                    interrupted = True
                    break
            history.seconds += throughput.seconds
            if not interrupted and (not history.val or history.val[-1][0] != self.step):
                val_loss = self.evaluate()
                self._report(history.train[-1][1], history.train[-1][2], 0.0, val_loss)
            checkpoint = self.save() or checkpoint
            if not interrupted:
                self._restore_best()
        return FitResult(self.step, history, interrupted, checkpoint)

    def _restore_best(self) -> None:
        """keep_best: end with the weights of the best evaluation (the last checkpoint stays
        the last step's, so a resumed run continues where it was)."""
        if self.best is None:
            return
        best_loss, weights = self.best
        self.history.best_step = next(step for step, loss in self.history.val
                                      if loss == best_loss)
        if self.history.best_step != self.step:
            self.model.load_state_dict(weights)

    def _finished(self, progress: float) -> bool:
        return progress >= 1.0 or (self.plateau is not None and self.plateau.finished(progress))

    def _watch_plateau(self, val_loss: float, progress: float) -> None:
        """plateau_patience: the decay begins from the evaluation before the best (the steps
        since it are trained again; the optimizer's moments stay, they describe the same
        stretch of the loss)."""
        if self.plateau is None:
            return
        if self.plateau.observe(val_loss, progress, self.hparams, self.model):
            if self.plateau.restart_weights is not None:
                self.model.load_state_dict(self.plateau.restart_weights)
            self._tell(f"validation has not improved for {self.plateau.patience} evaluations "
                       f"(step {self.step}): decaying from the evaluation before the best, to "
                       f"end at {self.plateau.end:.0%} of the budget")
        self.history.plateau = self.plateau.to_dict()

    def _tell(self, line: str) -> None:
        if self.rank == 0:
            self.on_message(line)

    def _progress(self) -> float:
        """Where the schedule stands before the next step, in [0, 1] (1: done): steps taken of
        ``steps``, or with ``seconds`` the larger of that and the clock's share. Every worker
        takes rank 0's clock, so all take the same steps at the same rates."""
        settings = self.settings
        progress = self.step / settings.steps
        if settings.seconds is not None:
            clock = torch.tensor([(self.history.seconds + self.segment.seconds)
                                  / settings.seconds], dtype=torch.float64)
            if self.world > 1:
                dist.broadcast(clock, src=0)
            progress = max(progress, float(clock))
        return min(progress, 1.0)

    def _expected_steps(self) -> int:
        """The run's length in steps, as far as it is known: ``steps``, or on a clock the pace
        so far extrapolated (for progress displays)."""
        if self.settings.seconds is None or not self.step:
            return self.settings.steps
        spent = (self.history.seconds + self.segment.seconds) / self.settings.seconds
        return min(self.settings.steps, max(self.step, round(self.step / max(spent, 1e-9))))

    def _take_step(self, source: BatchSource, progress: float) -> StepResult:
        """The optimizer step on this worker's share of the step's global batch."""
        tokens, mask = source.batch(self.step)
        mine = slice(self.rank * self.share_rows, (self.rank + 1) * self.share_rows)
        batch = tokens[mine], None if mask is None else mask[mine]
        rate = None if self.plateau is None else self.plateau.learning_rate(progress, self.hparams)
        taken = train_step(self.model, self.optimizer, batch, self.hparams,
                           progress=progress, step=self.step,
                           device=self.device, grad_accum=self.settings.grad_accum,
                           trained=self.trained, world=self.world, learning_rate=rate)
        self.step += 1
        self.history.tokens += self.hparams.batch_size * self.hparams.seq_len
        self.history.train.append((self.step, taken.loss, taken.learning_rate))
        return taken

    def _report(self, loss: float, lr: float, tokens_per_second: float,
                val_loss: float | None) -> None:
        if self.on_step is not None and self.rank == 0:
            self.on_step(StepReport(self.step, self._expected_steps(), loss, lr,
                                    self.history.tokens, tokens_per_second, val_loss))

    def evaluate(self) -> float:
        val_loss = evaluate(self.model, self.validation, self.device)
        self.history.val.append((self.step, val_loss))
        if self.settings.keep_best and (self.best is None or val_loss < self.best[0]):
            self.best = val_loss, cpu_weights(self.model)
        if self.sampler is not None and self.rank == 0:
            self.history.samples.append((self.step, self.sampler(self.model)))
        return val_loss

    def save(self) -> Path | None:
        if self.manager is None or self.rank != 0:
            return None
        return self.manager.save(RunState(
            model=cpu_weights(self.model),
            optimizer=self.optimizer.state_dict(), step=self.step, rng=capture_rng(),
            history=self.history.to_dict(), meta=self.meta))


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
