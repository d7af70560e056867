"""The final decay brought forward to where validation stops improving.

A schedule sized to the budget (cosine, WSD) puts its low-rate end at the end of the budget. On
a corpus the budget sees many times over, validation bottoms out long before that (the 30-minute
pretraining of tinyshakespeare peaked at step 3822 of 9829, at 0.7x the peak rate), and keeping
the best evaluation then keeps weights that never had the low-rate steps that are worth a few
per cent (a fine-tune at a tenth of the rate from those weights bettered them by 1.5%).

The plateau decay watches the evaluations. After ``patience`` of them without a new best it goes
back to the weights of the evaluation *before* the best and trains the same stretch again, the
rate now falling linearly from the schedule's there to the recipe's floor: WSD's cool-down, ended
at the best evaluation's token count. Then training ends; the rest of the budget would overfit.
Decaying from the best weights instead (tried first) trains past the best point: on the 5M
``mini`` preset, whose validation rose within an epoch of its best, the decayed end was worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from trainers.checkpoints import cpu_weights
from trainers.recipe import TrainHparams, learning_rate_at

# Two evaluations without a new best: one can be noise, two on the same fixed validation
# batches are a trend (evaluations are 1/16 of pretraining apart, a tenth of a timed baseline's).
PLATEAU_PATIENCE = 2

Weights = dict[str, torch.Tensor]


@dataclass
class PlateauDecay:
    patience: int = PLATEAU_PATIENCE
    best: float = math.inf
    since_best: int = 0
    last_progress: float = 0.0  # of the latest evaluation (0: the start)
    best_progress: float = 0.0
    restart_progress: float = 0.0  # of the evaluation the decay would start from
    # Once begun: where (schedule progress in [0, 1]), from which rate, and until where.
    start: float | None = None
    start_lr: float = 0.0
    end: float = 1.0
    # The weights of the latest evaluation and of the one the decay would start from: the one
    # before the best, or the best itself where it was the first (not in to_dict: a run resumed
    # before its decay begins may decay from where it stands).
    last_weights: Weights | None = field(default=None, repr=False)
    restart_weights: Weights | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")

    @property
    def decaying(self) -> bool:
        return self.start is not None

    def observe(self, val_loss: float, progress: float, hparams: TrainHparams,
                model: torch.nn.Module) -> bool:
        """Record an evaluation of ``model`` at ``progress``; True when this one begins the
        decay: the caller then loads ``restart_weights`` (when not None) into the model."""
        if self.decaying:
            return False
        interval = progress - self.last_progress
        if val_loss < self.best:
            if self.last_weights is not None:
                self.restart_weights, self.restart_progress = self.last_weights, self.last_progress
            else:
                self.restart_weights, self.restart_progress = cpu_weights(model), progress
            self.best, self.best_progress, self.since_best = val_loss, progress, 0
        else:
            self.since_best += 1
        self.last_progress = progress
        if self.since_best < self.patience:
            self.last_weights = cpu_weights(model)
            return False
        self.start = progress
        self.start_lr = learning_rate_at(self.restart_progress, hparams)
        self.end = min(1.0, progress + (self.best_progress - self.restart_progress or interval))
        self.last_weights = None
        return True

    def learning_rate(self, progress: float, hparams: TrainHparams) -> float:
        """The rate at ``progress``: the schedule's, or once decaying the linear decay's."""
        if self.start is None:
            return learning_rate_at(progress, hparams)
        floor = min(hparams.learning_rate * hparams.min_lr_fraction, self.start_lr)
        share = min(1.0, (progress - self.start) / max(1e-9, self.end - self.start))
        return self.start_lr - (self.start_lr - floor) * share

    def finished(self, progress: float) -> bool:
        return progress >= self.end

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    @classmethod
    def from_dict(cls, data: dict) -> PlateauDecay:
        return cls(**data)
