"""Train one candidate architecture for a short budget and score it on the fixed validation set.

``train_candidate`` never raises for a bad candidate: it returns a ``CandidateResult`` whose
status says what happened (ok, diverged, out_of_memory, failed with the error). With a token or
step budget and a seed, the result is reproducible: initialisation comes from the seed and every
batch is a pure function of (seed, step) in the store.
"""

from __future__ import annotations

import copy
import enum
import io
import math
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from chimera.config import BlockType, ChimeraConfig
from chimera.model import Chimera, param_counts_analytic, training_flops_per_token
from trainers.recipe import (
    TrainHparams,
    evaluate,
    learning_rate_at,  # noqa: F401 (importable from here, as before)
    make_optimizer,
)
from trainers.steps import NonFiniteLoss, Throughput, train_step
from trainers.store import TokenStore


class BudgetKind(str, enum.Enum):
    TOKENS = "tokens"
    STEPS = "steps"
    SECONDS = "seconds"


@dataclass(frozen=True)
class TrainBudget:
    kind: BudgetKind
    amount: float

    def __post_init__(self) -> None:
        if not self.amount > 0:
            raise ValueError(f"budget amount must be positive, got {self.amount}")

    def describe(self) -> str:
        return f"{self.amount:g} {self.kind.value}"


class Status(str, enum.Enum):
    """A candidate's status, as the trainer, the search loop and the run database spell it (the
    values are the database's strings). ``train_candidate`` returns the first four."""

    OK = "ok"
    DIVERGED = "diverged"
    OUT_OF_MEMORY = "out_of_memory"
    FAILED = "failed"
    PENDING = "pending"  # proposed, not started
    RUNNING = "running"
    CANCELLED = "cancelled"  # cut off (a deadline, an interrupt): an interrupted run owes it
    REJECTED = "rejected"  # no worker could train it (e.g. it would not fit in memory)

    @property
    def finished(self) -> bool:
        """Whether the candidate has its result (trained, failed or rejected)."""
        return self in FINISHED


# The run database's groupings: candidates with a result, and those an interrupted run owes.
FINISHED = (Status.OK, Status.DIVERGED, Status.OUT_OF_MEMORY, Status.FAILED, Status.REJECTED)
UNFINISHED = (Status.PENDING, Status.RUNNING, Status.CANCELLED)


@dataclass
class CandidateResult:
    status: Status
    val_loss: float | None = None  # nats per token
    val_bpb: float | None = None  # bits per byte of the validation text
    params: int = 0
    non_embedding_params: int = 0
    steps: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    # Of all ``steps`` (a continued candidate's earlier rungs included, like ``tokens``), by the
    # model's count (chimera.model.training_flops_per_token): a machine-independent cost.
    train_flops: float = 0.0
    wall_seconds: float = 0.0
    # CUDA: peak allocated during this candidate. CPU: the worker process's peak resident memory
    # so far (Linux has no per-interval peak), so in a reused worker it covers earlier ones too.
    peak_memory_mb: float = 0.0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    rung: int = 0  # with hurdles: the budget rung this result ends
    state: TrainingState | None = field(default=None, repr=False)  # with keep_state only

    def to_dict(self) -> dict:
        """Plain data (JSON-ready); the training state is not part of it."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state"}
        data["loss_curve"] = [list(point) for point in self.loss_curve]
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CandidateResult:
        data = dict(data)
        data["status"] = Status(data["status"])
        data["loss_curve"] = [tuple(point) for point in data.get("loss_curve", [])]
        return cls(**data)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# Bytes of fp32 training state per parameter: weights, gradients, AdamW's two moments.
_STATE_BYTES_PER_PARAM = 16
# What a worker process holds before its first candidate (interpreter, torch, the store mapping).
_PROCESS_BASELINE_BYTES = 500 * 2**20


def estimate_training_memory(config: ChimeraConfig, hparams: TrainHparams) -> int:
    """An upper estimate of the bytes one fp32 training step of ``config`` needs: training state
    (16 bytes per parameter) plus the activations autograd keeps for the backward pass, counted
    per token and layer from the tensors each block saves, plus the logits and their gradient.

    It decides which candidates are rejected before launch, so it errs high: on CPU it measures
    1.0-1.5x the peak resident memory of a fresh process (``python bench/cluster.py --memory``)."""
    d, w, f = config.d_model, config.lru_dim, config.ffn_hidden
    kv = config.n_kv_heads * config.head_dim
    mlp = 2 * d + 4 * f  # norm in/out, gate and up projections, their activations
    recurrent = d + 12 * w  # branches, GeLU gate, conv, two gates, decay, scan input and state
    attention = 3 * d + 2 * kv + 2 * d  # norm, q, k, v (rotated), attention output
    per_token = sum(mlp + (recurrent if kind is BlockType.RECURRENT else attention)
                    for kind in config.block_types)
    # Measured peaks run ~1.7x the saved tensors: gradients of activations in flight during the
    # backward pass and the allocator's slack (bench: python bench/cluster.py --memory).
    per_token = 1.75 * per_token + 4 * config.vocab_size + 2 * d  # + logits, fp32 copy, grad
    tokens = hparams.batch_size * hparams.seq_len
    params = param_counts_analytic(config).total
    return int(_PROCESS_BASELINE_BYTES + _STATE_BYTES_PER_PARAM * params
               + 4 * tokens * per_token)


def budget_steps(budget: TrainBudget, hparams: TrainHparams) -> int | None:
    """Optimizer steps a step or token budget buys; None for a seconds budget."""
    if budget.kind is BudgetKind.STEPS:
        return max(1, int(budget.amount))
    if budget.kind is BudgetKind.TOKENS:
        return max(1, int(budget.amount // (hparams.batch_size * hparams.seq_len)))
    return None  # seconds: the schedule follows the clock


@dataclass
class TrainingState:
    """Where a candidate's training stands: weights, optimizer moments, the step reached and
    the RNG, so that training continued from it equals training that never stopped (batches are
    a pure function of (seed, step), and the schedule of ``schedule_steps``)."""

    model: dict
    optimizer: dict
    step: int
    rng: torch.Tensor

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model, "optimizer": self.optimizer, "step": self.step,
                    "rng": self.rng}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingState:
        state = torch.load(io.BytesIO(data), weights_only=True)  # tensors and plain data only
        return cls(state["model"], state["optimizer"], state["step"], state["rng"])


def train_candidate(config: ChimeraConfig, store: TokenStore, budget: TrainBudget,
                    hparams: TrainHparams = TrainHparams(), *, seed: int = 0,
                    device: str | torch.device = "cpu",
                    on_progress: Callable[[], None] | None = None,
                    resume: TrainingState | None = None, schedule_steps: int | None = None,
                    keep_state: bool = False) -> CandidateResult:
    """Train ``config`` within ``budget`` and score it. Never raises for a bad candidate; the
    status and error say what went wrong. ``on_progress`` is called before every training step
    and evaluation batch: a worker's heartbeat, so a hung one can be told apart from a slow one.

    Continuing (the hurdles of a search): ``resume`` starts from a ``TrainingState`` instead of
    from scratch, and a step or token ``budget`` then counts the total steps to reach, not the
    steps to add. ``schedule_steps`` sets the length the learning-rate schedule spans (default:
    the budget's steps), so a short first rung and its continuation follow the schedule of one
    long run. ``keep_state`` puts the final ``TrainingState`` in ``result.state``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = CandidateResult(status=Status.FAILED)
    try:
        model, optimizer, step = _start(config, store, budget, hparams, seed, device, resume,
                                        result)
        _train(model, optimizer, store, budget, hparams, seed=seed, device=device, step=step,
               schedule_steps=schedule_steps, on_progress=on_progress, result=result)
        if keep_state:  # before evaluation, which draws no randomness but switches modes
            result.state = TrainingState(
                {k: v.detach().clone() for k, v in model.state_dict().items()},
                copy.deepcopy(optimizer.state_dict()), result.steps, torch.get_rng_state())
        if result.status is not Status.DIVERGED:
            _score(model, store, hparams, device, on_progress, result)
    except torch.OutOfMemoryError as err:
        result.status, result.error = Status.OUT_OF_MEMORY, str(err).splitlines()[0]
    except MemoryError:
        result.status, result.error = Status.OUT_OF_MEMORY, "host memory exhausted"
    except Exception as err:  # a bad candidate must never take the search down
        result.status = Status.FAILED
        result.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
    result.wall_seconds = time.perf_counter() - start
    result.peak_memory_mb = _peak_memory_mb(device)
    return result


def _start(config: ChimeraConfig, store: TokenStore, budget: TrainBudget, hparams: TrainHparams,
           seed: int, device: torch.device, resume: TrainingState | None,
           result: CandidateResult) -> tuple[Chimera, torch.optim.Optimizer, int]:
    """The model (from ``seed``), its optimizer and the step training starts at: 0, or where
    ``resume`` left off (weights, optimizer moments and RNG restored). Counts the parameters
    into ``result``."""
    if config.vocab_size < store.vocab_size:
        raise ValueError(f"config vocab_size {config.vocab_size} is smaller than the store's "
                         f"{store.vocab_size}")
    torch.manual_seed(seed)
    model = Chimera(config).to(device)
    counts = model.param_counts()
    result.params, result.non_embedding_params = counts.total, counts.non_embedding
    optimizer = make_optimizer(model, hparams)
    if resume is None:
        return model, optimizer, 0
    if budget_steps(budget, hparams) is None:
        raise ValueError("continuing a candidate needs a step or token budget")
    model.load_state_dict(resume.model)
    optimizer.load_state_dict(resume.optimizer)
    torch.set_rng_state(resume.rng)
    return model, optimizer, resume.step


def _train(model: Chimera, optimizer: torch.optim.Optimizer, store: TokenStore,
           budget: TrainBudget, hparams: TrainHparams, *, seed: int, device: torch.device,
           step: int, schedule_steps: int | None, on_progress: Callable[[], None] | None,
           result: CandidateResult) -> None:
    """Optimizer steps from ``step`` until the budget is spent or the loss diverges; the
    steps, tokens, throughput, FLOPs and loss curve (step 1 and every 10th) go into ``result``,
    and a divergence sets its status."""
    total_steps = budget_steps(budget, hparams)
    schedule = schedule_steps or total_steps
    tokens_per_step = hparams.batch_size * hparams.seq_len
    throughput = Throughput()
    while (progress := _schedule_progress(budget, total_steps, schedule, step,
                                          throughput.seconds)) is not None:
        if on_progress:
            on_progress()
        batch = store.sample("train", hparams.batch_size, hparams.seq_len, seed, step)
        try:
            loss = train_step(model, optimizer, (batch, None), hparams, progress=progress,
                              step=step, device=device).loss
        except NonFiniteLoss as err:
            result.status, result.error = Status.DIVERGED, f"loss {err.loss} at step {step}"
            break
        step += 1
        throughput.add(tokens_per_step)
        if step == 1 or step % 10 == 0:
            result.loss_curve.append((step, loss))
    result.tokens_per_second = throughput.per_second()
    result.steps, result.tokens = step, step * tokens_per_step
    result.train_flops = float(result.tokens * training_flops_per_token(model.config,
                                                                        hparams.seq_len))


def _schedule_progress(budget: TrainBudget, total_steps: int | None, schedule: int | None,
                       step: int, elapsed: float) -> float | None:
    """Where the learning-rate schedule stands before step ``step`` (``elapsed`` seconds into
    training); None once the budget is spent. A seconds budget's schedule follows the clock."""
    if total_steps is not None:
        return None if step >= total_steps else min(1.0, step / schedule)
    return None if elapsed >= budget.amount else elapsed / budget.amount


def _score(model: Chimera, store: TokenStore, hparams: TrainHparams, device: torch.device,
           on_progress: Callable[[], None] | None, result: CandidateResult) -> None:
    """The validation loss and bits per byte on the store's fixed validation batches; a
    non-finite loss is a divergence."""
    val_batches = store.validation_batches(hparams.batch_size, hparams.seq_len,
                                           hparams.eval_batches)
    result.val_loss = evaluate(model, val_batches, device, on_progress)
    if math.isfinite(result.val_loss):
        result.val_bpb = store.bits_per_byte(result.val_loss, "val")
        result.status = Status.OK
    else:
        result.status, result.error = Status.DIVERGED, "non-finite validation loss"
