"""``chimera promote --budget``: the stages sized to a wall clock.

A user gives promote the time they have, not token counts. The plan splits it: the evaluation
gets a fixed share, fine-tuning a fixed share or, when fewer seconds train its --sft-steps, those
(``SFT_HEADROOM``), refinement the share asked for (none by default: at CPU
budgets its best trial was the search's own defaults, so it bought nothing; see BENCHMARKS.md),
and pretraining everything else, less what the promote already spent getting there. Tokens and
steps follow from this machine's training speed for the model, measured here on a few steps of
the model itself (the search's figure was measured beside other workers, on one thread).
Pretraining and fine-tuning then run on the clock: each stops when its seconds are spent, its
learning-rate schedule following them, so a measurement that reads the speed low or high moves
only the evaluations' cadence, not the time the model trains (the measured 8 steps were 0.75x
the loop's speed in one 10-minute bench run: a step-sized plan ended pretraining with a quarter
of its time unused; and fine-tuning's longer sequences train at another speed than pretraining's
measured one).

With ``--dpo``, preference tuning is not in the plan: it runs its ``--dpo-steps`` after the
budgeted stages (TRL's loop has no wall clock to stop on, and its step, two sequences per pair
through the policy and the frozen reference, trains at another speed than the one measured).

The plan is made once and kept in the stage records, so a rerun of an interrupted promote
resumes the same plan (its checkpoints belong to it) instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from chimera.config import ChimeraConfig
from chimera.model import param_counts_analytic
from cluster.app.promote.finalists import affordable
from cluster.app.promote.settings import PromoteSettings
from trainers.pretrain import measure_tokens_per_second
from trainers.recipe import TrainHparams
from trainers.store import TokenStore

SFT_SHARE = 0.15  # at most: see SFT_HEADROOM
EVALUATE_SHARE = 0.05
# Fine-tuning's seconds for --sft-steps, estimated from pretraining's measured speed, times this:
# its sequences are longer and the stage builds its conversations first. Four small winners
# of the 30-minute bench (0.19-0.44M) took 0.95-1.07x the time of their 400 steps' tokens at
# their pretraining loop's speed (44-99 s of a 176-180-s share; those pipelines ended 127-310 s
# early).
SFT_HEADROOM = 1.25
# Refinement's trials stop early (Hyperband), so a study of N trials at T tokens trains about
# this many times N * T tokens.
REFINE_COST_PER_TRIAL = 0.5
MIN_PRETRAIN_STEPS = 20
# The pretraining loop against the bare steps measured before it (its evaluations, sample
# generations, checkpoints and display, and the measurement's own noise): 5,231 / 5,038 / 5,009
# tokens/s in the loop against 6,399 / 4,704 / 5,061 measured on 4 steps (three 10-minute runs of
# bench/end_to_end.py on tinyshakespeare: 0.82x, 1.07x, 0.99x). Now 8 steps are measured, and
# the plan takes 0.9 of them: a promote had better end a little early than overrun.
LOOP_EFFICIENCY = 0.9
# Pretraining that will see its corpus this many times over trains with at least
# PRETRAIN_DROPOUT (LARGE_MODEL_DROPOUT for a large model: below). The search ranks genomes
# after seconds, where dropout only slows learning, so its winners carry little or none;
# pretrained for many epochs they overfit. On the 30-minute bench's tinyshakespeare, 360 s
# each, held-out bpb (BENCHMARKS.md): its 1.69M winner 1.9377 at dropout 0, 1.8797 at 0.1,
# 1.8710 at 0.2; its 0.24M kind 1.9153 at 0, 1.8810 at 0.1, 1.8866 at 0.2. The rate follows
# the model's size against its corpus: the 1.69M model, four parameters per training token,
# wants 0.2 (LARGE_MODEL_DROPOUT, from as many parameters as tokens); the 0.24M one, half a
# parameter per token, 0.1. Four epochs: about where repeated tokens stop being worth new ones
# (Muennighoff et al., 2023).
REPEATED_EPOCHS = 4.0
PRETRAIN_DROPOUT = 0.1
LARGE_MODEL_DROPOUT = 0.2
# A stage on the clock is capped at this many times the steps the plan expects: a loop runs
# faster than its measurement, not this much faster, and a cap keeps a stalled clock finite.
STEP_CAP = 3


@dataclass(frozen=True)
class StagePlan:
    """What a budget buys on this machine: tokens and steps per stage (pretraining's tokens
    are what its seconds are expected to train)."""

    budget_seconds: float
    tokens_per_second: float  # of this model's training loop, measured here
    pretrain_seconds: float
    pretrain_tokens: int
    refine_tokens: int | None  # per trial; None: no refinement
    sft_steps: int  # at most: --sft-steps, or the clock's cap
    sft_seconds: float | None = None  # None: a plan made before fine-tuning ran on the clock
    finalists: int = 1  # sharing pretraining's seconds (finalists.py); 1: the winner alone

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StagePlan:
        return cls(**data)

    def applied(self, settings: PromoteSettings) -> PromoteSettings:
        """``settings`` with the plan's tokens and steps."""
        return dataclasses.replace(settings, pretrain_tokens=self.pretrain_tokens,
                                   pretrain_seconds=self.pretrain_seconds,
                                   refine_tokens=self.refine_tokens,
                                   sft_steps=self.sft_steps, sft_seconds=self.sft_seconds)


def plan_stages(settings: PromoteSettings, config: ChimeraConfig, hparams: TrainHparams,
                store: TokenStore, spent_seconds: float, finalists: int = 1) -> StagePlan:
    """Split ``settings.budget_seconds`` (of which ``spent_seconds`` are gone) over the stages
    for ``config`` trained with ``hparams``; pretraining's seconds are shared by as many of
    ``finalists`` as they afford (``finalists.affordable``)."""
    budget = settings.budget_seconds
    began = time.perf_counter()
    rate = LOOP_EFFICIENCY * measure_tokens_per_second(config, hparams, store,
                                                       device=settings.device)
    spent_seconds += time.perf_counter() - began  # the measurement is part of the budget
    refine_seconds = settings.refine_share * budget
    sft_step_tokens = settings.sft_hparams.batch_size * settings.sft_hparams.seq_len
    # Fine-tuning ends at --sft-steps: a model that trains them in less than its share leaves
    # the rest to pretraining.
    sft_seconds = min(SFT_SHARE * budget,
                      SFT_HEADROOM * settings.sft_steps * sft_step_tokens / rate)
    pretrain_seconds = budget * (1 - EVALUATE_SHARE) - sft_seconds - refine_seconds \
        - spent_seconds
    step_tokens = hparams.batch_size * hparams.seq_len
    if pretrain_seconds * rate < MIN_PRETRAIN_STEPS * step_tokens:
        raise ValueError(f"--budget {budget:.0f}s leaves {max(pretrain_seconds, 0):.0f}s for "
                         f"pretraining, under {MIN_PRETRAIN_STEPS} steps of this model at "
                         f"{rate:,.0f} tokens/s here; give a larger --budget")
    refine_tokens = None
    if refine_seconds > 0:
        # Trials train side by side, each on its share of the machine.
        per_trial = refine_seconds * rate / (settings.refine.trials * REFINE_COST_PER_TRIAL)
        refine_tokens = max(step_tokens * settings.refine.rungs, int(per_trial))
    expected = max(1, int(sft_seconds * rate / sft_step_tokens))
    return StagePlan(budget, rate, pretrain_seconds, int(pretrain_seconds * rate),
                     refine_tokens, min(settings.sft_steps, STEP_CAP * expected), sft_seconds,
                     affordable(finalists, pretrain_seconds, rate, step_tokens))


def pretrain_dropout(config: ChimeraConfig, pretrain_tokens: int, train_tokens: int) -> float:
    """The dropout to pretrain ``config`` with for ``pretrain_tokens`` of a corpus of
    ``train_tokens``: the genome's, raised when the pretraining will repeat the corpus
    ``REPEATED_EPOCHS`` times or more, to ``LARGE_MODEL_DROPOUT`` for a model with at least as
    many parameters as the corpus has tokens, else to ``PRETRAIN_DROPOUT``."""
    if pretrain_tokens < REPEATED_EPOCHS * train_tokens:
        return config.dropout
    large = param_counts_analytic(config).total >= train_tokens
    return max(config.dropout, LARGE_MODEL_DROPOUT if large else PRETRAIN_DROPOUT)
