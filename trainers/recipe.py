"""The training recipe every loop shares: hyperparameters, the learning-rate schedule, the
optimizer, the loss and the evaluation. Candidate training, Optuna refinement, full pretraining
and chat fine-tuning all go through these, so a hyperparameter means the same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.muon import Muon

SCHEDULES = ("cosine", "wsd")
# adamw: AdamW on every parameter. muon: Muon (momentum orthogonalised by Newton-Schulz, as in
# modded-nanogpt) on the blocks' linear weights, AdamW on the embedding, head, norms and gates.
# AdamW stays the default: at the 0.2-1M parameters of a CPU search, Muon at AdamW's learning
# rate was level or worse in equal wall clock (bench/recipe_pairs.py, BENCHMARKS.md).
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainHparams:
    """Training hyperparameters (the promote step's Optuna study tunes most of them)."""

    learning_rate: float = 3e-3
    min_lr_fraction: float = 0.1  # the schedule decays to this share of the peak
    warmup_fraction: float = 0.1
    # cosine: warmup, then cosine decay. wsd (warmup-stable-decay): warmup, the peak held, then
    # a linear decay over the last ``decay_fraction`` of training.
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    batch_size: int = 16  # sequences per optimizer step (the global batch)
    seq_len: int = 128
    eval_batches: int = 8  # of the fixed validation set
    label_smoothing: float = 0.0
    z_loss: float = 0.0  # weight of the log-partition penalty (PaLM), keeps logits from drifting
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got "
                             f"{self.batch_size} and {self.seq_len}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainHparams:
        # Records from before the optimizer was a setting trained with AdamW: resumed, they
        # go on with it (a checkpoint's moments are AdamW's).
        return cls(**{"optimizer": "adamw", **data})


def learning_rate_at(progress: float, hparams: TrainHparams) -> float:
    """The learning rate at ``progress`` in [0, 1] of training: linear warmup, then cosine decay
    (or, for WSD, a plateau and a final linear decay) to ``min_lr_fraction`` of the peak."""
    peak, floor = hparams.learning_rate, hparams.min_lr_fraction
    if progress < hparams.warmup_fraction:
        return peak * (progress / hparams.warmup_fraction)
    if hparams.schedule == "wsd":
        decay_start = max(hparams.warmup_fraction, 1 - hparams.decay_fraction)
        if progress < decay_start:
            return peak
        decay = min(1.0, (progress - decay_start) / max(1e-9, 1 - decay_start))
        return peak * (1 - (1 - floor) * decay)
    decay = (progress - hparams.warmup_fraction) / max(1e-9, 1 - hparams.warmup_fraction)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, decay)))
    return peak * (floor + (1 - floor) * cosine)


class Optimizers:
    """Several optimizers stepped as one: the ``param_groups``, ``step``, ``zero_grad`` and
    state-dict surface the training loops use, so Muon's matrices and AdamW's rest share one
    learning-rate schedule and one checkpoint."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, part in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(part)


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter],
                                                 list[torch.nn.Parameter]]:
    """Muon's parameters (the weights of the linear layers between the embedding and the
    output head) and the rest, AdamW's, in ``model.parameters()`` order."""
    head = getattr(model, "lm_head", None)
    matrices = [module.weight for module in model.modules()
                if isinstance(module, torch.nn.Linear) and module is not head]
    taken = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in taken]


def make_optimizer(model: torch.nn.Module, hparams: TrainHparams):
    """AdamW with weight decay on matrices only (not on norms, biases, Lambda or the conv); with
    ``optimizer="muon"``, Muon (``trainers.muon``) takes the hidden linear weights at the same
    learning rate and weight decay, so that one schedule and one Optuna range serve both."""
    muon, rest = muon_split(model) if hparams.optimizer == "muon" \
        else ([], list(model.parameters()))
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": hparams.weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=hparams.learning_rate, betas=(hparams.beta1, hparams.beta2))
    if not muon:
        return adamw
    return Optimizers([Muon(muon, lr=hparams.learning_rate,
                            weight_decay=hparams.weight_decay), adamw])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
            label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over (B, T) targets, counting only positions where ``mask`` is set
    (the assistant tokens of a conversation). With ``z_loss``, adds z_loss * log(Z)^2 per token."""
    logits = logits.float().flatten(0, 1)
    per_token = F.cross_entropy(logits, targets.flatten(), reduction="none",
                                label_smoothing=label_smoothing)
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    if mask is None:
        return per_token.mean()
    mask = mask.flatten().to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 matmuls are slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device,
             on_progress: Callable[[], None] | None = None) -> float:
    """Mean loss in nats per predicted token. Each batch is a (B, T + 1) token tensor, or a
    (tokens, mask) pair whose mask (B, T) marks the targets that count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        if on_progress:
            on_progress()
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        tokens = tokens.to(device)
        with autocast_for(device):
            logits, _ = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                                 reduction="none")
        if mask is not None:
            mask = mask.to(device).flatten().float()
            total += (losses * mask).sum().item()
            count += mask.sum().item()
        else:
            total += losses.sum().item()
            count += losses.numel()
    model.train(was_training)
    return total / max(count, 1)
