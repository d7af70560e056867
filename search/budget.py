"""A search's compute budget: wall-clock seconds and training FLOPs, and whether the next
candidate (or a hurdled candidate's next rung) fits in what is left.

Time: no training starts that could not reach the full budget (the last hurdle rung) before the
deadline, judged by the median duration of each rung so far. A candidate cut short at an early
rung is ranked below every one that went further and cannot be the search's winner, so a rung
that cannot be followed through is compute spent on nothing.

FLOPs: predicted before launch from the genome (``flops_of(genome, rung)``: training it from
scratch to the end of ``rung``), a machine-independent budget, so searches on different machines
or days spend the same compute. A candidate in flight holds its full budget's FLOPs, so a
hurdled one can continue; once it stops, what it trained is what it spent. One waiting for a
rung's bar holds only what it trained (the first few of a rung would otherwise hold the budget
idle), and continues only if its full budget fits again.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from enum import Enum

from search.genome import Genome
from search.hurdles import Hurdles


class Affordable(Enum):
    """Whether a candidate's full budget fits in the FLOPs left."""

    YES = "yes"
    LATER = "later"  # not now, but a hurdled candidate in flight may stop early and give back
    NEVER = "never"


class ComputeBudget:
    def __init__(self, wall_seconds: float | None = None, flops_limit: float | None = None,
                 flops_of: Callable[[Genome, int], float] | None = None,
                 hurdles: Hurdles | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 known_seconds: float | None = None) -> None:
        """``wall_seconds``, ``flops_limit``: the limits (None: none); ``flops_of(genome,
        rung)``: the FLOPs of training ``genome`` to the end of ``rung`` (needed by a FLOPs
        limit); ``hurdles``: the rungs every candidate trains in (None: one);
        ``known_seconds``: a candidate's training time when its budget is one (the expectation
        until candidates have finished)."""
        if flops_limit is not None and flops_of is None:
            raise ValueError("a FLOPs budget needs the FLOPs of training a genome (train_flops)")
        self.wall_seconds, self.flops_limit, self.flops_of = wall_seconds, flops_limit, flops_of
        self.hurdles, self.clock, self.known_seconds = hurdles, clock, known_seconds
        self.start_time = 0.0
        self.deadline = math.inf
        self.durations: dict[int, list[float]] = {}  # rung -> seconds each finished one took
        self.spent = 0.0  # FLOPs of finished training: earlier sessions' and this one's
        self.held: dict[int, float] = {}  # candidate id -> the FLOPs it holds
        self.settled: list[float] = []  # FLOPs each candidate finished this session trained

    # ------------------------------------------------------------------ time
    def start(self, already_flops: float = 0.0) -> None:
        """The search starts now; ``already_flops``: what earlier sessions spent (resume)."""
        self.start_time = self.clock()
        self.deadline = self.start_time + (self.wall_seconds or math.inf)
        self.spent = already_flops

    def elapsed(self) -> float:
        return self.clock() - self.start_time

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def record_duration(self, rung: int, seconds: float) -> None:
        """A candidate finished ``rung`` in ``seconds``."""
        self.durations.setdefault(rung, []).append(seconds)

    def expected_seconds(self, rung: int) -> float:
        """How long training ``rung`` will take: the median of that rung so far, else the first
        rung's median scaled by the steps the rung adds (a rung-2 continuation is 6x rung 0),
        else ``known_seconds`` (or 0: unknown)."""
        if self.durations.get(rung):
            return statistics.median(self.durations[rung])
        if rung and self.durations.get(0):
            return statistics.median(self.durations[0]) * self.hurdles.relative_cost(rung)
        return self.known_seconds or 0.0

    def seconds_per_candidate(self) -> float:
        """A new candidate's expected training time, its continuations included: with hurdles
        each rung's time weighted by the share expected to reach it (``keep_fraction`` per
        rung); 0 before any result."""
        if not self.hurdles:
            return self.expected_seconds(0)
        return sum(self.hurdles.keep_fraction ** rung * self.expected_seconds(rung)
                   for rung in range(self.hurdles.rungs))

    def expected_candidates(self, launched: int, slots: int) -> int | None:
        """How many candidates the search will have launched when its budget is spent, at
        the pace so far: ``launched`` now, plus what ``slots`` workers train in the time left
        and what the FLOPs left pay for (the smaller); None before any candidate finished, or
        with neither limit."""
        more: list[float] = []
        per_candidate = self.seconds_per_candidate()
        if self.wall_seconds is not None and per_candidate > 0:
            more.append(slots * self.seconds_left() / per_candidate)
        if self.flops_limit is not None and self.settled and statistics.mean(self.settled) > 0:
            more.append(max(0.0, self.flops_limit - self.committed)
                        / statistics.mean(self.settled))
        return launched + math.floor(min(more)) if more else None

    def time_reason(self, rung: int = 0) -> str | None:
        """Why training from ``rung`` on must not start: it would not reach the full budget (the
        last rung) before the deadline; None if it may."""
        if self.wall_seconds is None:
            return None
        last = self.hurdles.rungs if self.hurdles else 1
        needed = sum(self.expected_seconds(r) for r in range(rung, last))
        if self.clock() + needed > self.deadline:
            return "the time budget would be overrun before another candidate's full budget"
        return None

    # ------------------------------------------------------------------ FLOPs
    @property
    def counts_flops(self) -> bool:
        return self.flops_limit is not None

    @property
    def committed(self) -> float:
        """The FLOPs spent and held."""
        return self.spent + sum(self.held.values())

    @property
    def flops_reason(self) -> str:
        return (f"the compute budget ({self.flops_limit:.3g} training FLOPs) has no room "
                f"for another candidate's full budget")

    def full_flops(self, genome: Genome) -> float:
        """The FLOPs of training ``genome`` to its full budget (the last rung)."""
        return self.flops_of(genome, self.hurdles.rungs - 1 if self.hurdles else 0)

    def affordable(self, genome: Genome, in_flight: int = 0) -> Affordable:
        """Whether training ``genome`` to its full budget fits in the FLOPs left (YES without a
        FLOPs limit); LATER: not now, but with hurdles one of the ``in_flight`` candidates may
        stop early and give back what it holds."""
        if self.flops_limit is None:
            return Affordable.YES
        if self.committed + self.full_flops(genome) <= self.flops_limit:
            return Affordable.YES
        return Affordable.LATER if self.hurdles and in_flight else Affordable.NEVER

    def hold(self, candidate_id: int, genome: Genome) -> None:
        """The candidate was launched: it holds its full budget's FLOPs (with a FLOPs limit)."""
        if self.flops_limit is not None:
            self.held[candidate_id] = self.full_flops(genome)

    def hold_trained(self, candidate_id: int, trained: float) -> None:
        """The candidate is idle until judged (waiting for a rung's bar): it holds only the
        FLOPs it has ``trained``."""
        if candidate_id in self.held:
            self.held[candidate_id] = trained

    def hold_full_again(self, candidate_id: int, genome: Genome) -> bool:
        """Whether the candidate can hold its full budget's FLOPs again, to continue (it holds
        them already unless it waited for a rung's bar); it holds them if so."""
        if self.flops_limit is None:
            return True
        full = self.full_flops(genome)
        if self.committed - self.held[candidate_id] + full > self.flops_limit:
            return False
        self.held[candidate_id] = full
        return True

    def settle(self, candidate_id: int, trained: float) -> None:
        """The candidate goes no further: what it ``trained`` is spent, the rest given back."""
        if self.held.pop(candidate_id, None) is not None:
            self.spent += trained
            self.settled.append(trained)
