"""The final decay brought forward to where validation stops improving.

A schedule sized to the budget (cosine, WSD) puts its low-rate end at the end of the budget. On
a corpus the budget sees many times over, validation bottoms out long before that (the 30-minute
pretraining of tinyshakespeare peaked at step 3822 of 9829, at 0.7x the peak rate), and keeping
the best evaluation then keeps weights that never had the low-rate steps that are worth a few
per cent (a fine-tune at a tenth of the rate from those weights bettered them by 1.5%). The
plateau decay watches the evaluations; after ``patience`` of them without a new best it goes back
to the best weights and decays the rate linearly from where the schedule stands to the recipe's
floor, over ``decay_fraction`` of the training done so far (the share WSD gives its decay), and
then training ends: the rest of the budget would only overfit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trainers.recipe import TrainHparams, learning_rate_at

# Two evaluations without a new best: one can be noise, two on the same fixed validation
# batches are a trend (evaluations are 1/16 of pretraining apart, a tenth of a timed baseline's).
PLATEAU_PATIENCE = 2


@dataclass
class PlateauDecay:
    patience: int = PLATEAU_PATIENCE
    best: float = math.inf
    since_best: int = 0
    # Once begun: where (schedule progress in [0, 1]), from which rate, and until where.
    start: float | None = None
    start_lr: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")

    @property
    def decaying(self) -> bool:
        return self.start is not None

    def observe(self, val_loss: float, progress: float, hparams: TrainHparams) -> bool:
        """Record an evaluation at ``progress``; True when this one begins the decay (the caller
        then goes back to the best weights)."""
        if val_loss < self.best:
            self.best, self.since_best = val_loss, 0
            return False
        self.since_best += 1
        if self.decaying or self.since_best < self.patience:
            return False
        self.start, self.start_lr = progress, learning_rate_at(progress, hparams)
        self.end = min(1.0, progress * (1 + hparams.decay_fraction))
        return True

    def learning_rate(self, progress: float, hparams: TrainHparams) -> float:
        """The rate at ``progress``: the schedule's, or once decaying the linear decay's."""
        if self.start is None:
            return learning_rate_at(progress, hparams)
        floor = hparams.learning_rate * hparams.min_lr_fraction
        share = min(1.0, (progress - self.start) / max(1e-9, self.end - self.start))
        return self.start_lr - (self.start_lr - min(floor, self.start_lr)) * share

    def finished(self, progress: float) -> bool:
        return progress >= self.end

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PlateauDecay:
        return cls(**data)
