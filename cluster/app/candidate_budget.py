"""What each candidate of a search trains, when the user does not say: equal time on a wall
clock, a fixed number of tokens otherwise.

What the user keeps is the model their pretraining time makes, so a search on a wall clock ranks
candidates by what they reach in equal time on this machine, not in equal tokens: a genome twice
as fast to train gets twice the tokens, as it will in pretraining. Measured (BENCHMARKS.md, "End
to end", tinyshakespeare, 10 minutes): against the ranking at 100K tokens it is a wash for the
final model (1.9088 against 1.9118 bpb on one seed, a third of the seed-to-seed spread); it picks
smaller, faster genomes of the same quality, breeds more children in the same time, and is what
"the same compute on your machine" means. Seconds depend on the machine's load; tokens rank
reproducibly (``--candidate-tokens``).
"""

from __future__ import annotations

import math
import os

from trainers.candidate import BudgetKind, TrainBudget

TOKENS_PER_CANDIDATE = 100_000  # a search without a wall clock (or with hurdles, FLOPs)
CANDIDATE_SECONDS_RANGE = (10.0, 120.0)  # the equal time's bounds


def candidate_seconds_for(wall_seconds: float, workers: int) -> float:
    """Each candidate's training seconds in a search of ``wall_seconds`` on ``workers``: the
    square root of the worker-seconds scaled to 20 s for the default 3-minute search on 2
    workers (about 15 candidates), ~37 s for 10 minutes, ~90 s for an hour, within
    ``CANDIDATE_SECONDS_RANGE``. Longer candidates rank better; more of them search more."""
    low, high = CANDIDATE_SECONDS_RANGE
    return min(high, max(low, 20.0 * math.sqrt(wall_seconds * max(1, workers) / 360.0)))


def default_candidate_budget(wall_seconds: float | None, train_flops: float | None,
                             hurdles: bool, workers: int | None,
                             cpus_per_candidate: float) -> TrainBudget:
    """Equal time (``candidate_seconds_for``) for a search on a wall clock; for one limited
    otherwise, or with hurdles or a FLOPs budget (which count steps), ``TOKENS_PER_CANDIDATE``.
    ``workers`` None: as many as this machine's CPUs allow."""
    if wall_seconds is None or hurdles or train_flops is not None:
        return TrainBudget(BudgetKind.TOKENS, TOKENS_PER_CANDIDATE)
    workers = workers or max(1, int((os.cpu_count() or 1) // cpus_per_candidate))
    return TrainBudget(BudgetKind.SECONDS, round(candidate_seconds_for(wall_seconds, workers),
                                                 1))
