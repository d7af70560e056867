"""The search loop: keeps every worker busy, records everything, stops within its limits.

It knows a strategy (``ask``/``tell``), an ``Evaluator`` (where candidates train: in this process
for tests, a Ray actor pool in production) and a ``Recorder`` (where results go: the run
database). It never imports Ray or the database; it passes plain data.

A genome is never trained twice: a proposal whose genome already has a recorded result is told
that result at once and recorded as reused. Limits: wall-clock seconds (no candidate is launched
that would overrun, judged by the median duration so far; what is still running at the deadline
is cancelled and recorded), training FLOPs (predicted before launch from the genome and the
budget: no candidate is launched whose full budget would overrun; a machine-independent budget,
so searches on different machines or days spend the same compute), a number of candidates, and a
number of generations.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from search.evolution import Proposal
from search.genome import Genome
from search.hurdles import Hurdles
from search.objectives import Objectives

FAILED_FITNESS = math.inf
REJECTED = "rejected"  # the status of a candidate no worker could train


class Strategy(Protocol):
    def ask(self) -> Proposal | None:
        """The next candidate to train, or None when the strategy has nothing to propose now."""

    def tell(self, candidate_id: int, proposal: Proposal, fitness: float | tuple[float, ...],
             rung: int = 0) -> None:
        """``fitness`` of a finished candidate; ``rung``: the furthest hurdle rung it reached
        (strategies that ignore hurdles may ignore it)."""


class Evaluator(Protocol):
    slots: int  # how many candidates can train at once

    def submit(self, candidate_id: int, genome: Genome, rung: int = 0) -> None:
        """Train ``genome``; with hurdles, ``rung`` > 0 continues it from its checkpoint."""

    def next_result(self, timeout: float | None) -> tuple[int, dict] | None:
        """(candidate id, result as plain data) of the next finished candidate, or None."""

    def in_flight(self) -> int: ...

    def running(self) -> dict[int, str]:
        """Candidate id -> worker name, for what is training now."""

    def cancel_all(self) -> list[int]: ...

    def rejection(self, genome: Genome) -> str | None:
        """Why ``genome`` cannot train on any worker (e.g. too large for memory), or None."""

    def release(self, candidate_id: int) -> None:
        """The candidate will not be continued: drop what was kept for it (a checkpoint)."""


class Recorder(Protocol):
    def lookup(self, genome_key: str) -> tuple[int, dict] | None:
        """(candidate id, result) of a finished candidate with this genome, if any."""

    def record_proposal(self, proposal: dict) -> int: ...

    def record_start(self, candidate_id: int, worker: str) -> None: ...

    def record_result(self, candidate_id: int, result: dict) -> None: ...

    def record_reused(self, proposal: dict, source_id: int, result: dict) -> int: ...

    def record_cancelled(self, candidate_id: int, reason: str) -> None: ...

    def record_rung(self, candidate_id: int, rung: int, result: dict) -> None: ...


@dataclass(frozen=True)
class SearchLimits:
    wall_seconds: float | None = None
    max_candidates: int | None = None  # launched (trained or reused), resumed ones included
    max_generations: int | None = None  # children deeper than this are not launched
    train_flops: float | None = None  # of all training, earlier sessions' included (resume)

    def __post_init__(self) -> None:
        if self.wall_seconds is None and self.max_candidates is None \
                and self.max_generations is None and self.train_flops is None:
            raise ValueError("a search needs a limit: wall-clock seconds, training FLOPs, a "
                             "number of candidates or a number of generations")
        if self.train_flops is not None and not self.train_flops > 0:
            raise ValueError(f"train_flops must be positive, got {self.train_flops}")


@dataclass
class SearchReport:
    launched: int = 0
    completed: int = 0
    reused: int = 0
    rejected: int = 0
    promoted: int = 0  # continuations to a higher hurdle rung
    cancelled: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""
    seconds: float = 0.0


def fitness_of(result: dict) -> float:
    value = result.get("val_bpb")
    return value if result.get("status") == "ok" and value is not None else FAILED_FITNESS


def proposal_record(proposal: Proposal) -> dict:
    genome = proposal.genome
    return {"genome": genome.to_dict(), "genome_key": genome.key, "summary": genome.summary(),
            "parents": list(proposal.parents), "operator": proposal.operator,
            "generation": proposal.generation}


class SearchLoop:
    def __init__(self, strategy: Strategy, evaluator: Evaluator, recorder: Recorder,
                 limits: SearchLimits,
                 clock: Callable[[], float] = time.monotonic,
                 on_tick: Callable[[], None] | None = None, poll_seconds: float = 0.5,
                 hurdles: Hurdles | None = None, objectives: Objectives | None = None,
                 rung_history: list[tuple[int, float]] = (),
                 train_flops: Callable[[Genome, int], float] | None = None) -> None:
        """``hurdles``: train every candidate in budget rungs, continuing only those that clear
        each rung's hurdle (the evaluator must support ``rung``); ``rung_history``: the (rung,
        bits per byte) results of an earlier session, which keep setting the bars on resume.
        ``objectives``: what the strategy is told (default: bits per byte alone).
        ``train_flops(genome, rung)``: the FLOPs of training ``genome`` from scratch to the end
        of ``rung`` (needed by a ``limits.train_flops`` budget)."""
        if limits.train_flops is not None and train_flops is None:
            raise ValueError("a FLOPs budget needs the FLOPs of training a genome (train_flops)")
        self.strategy, self.evaluator, self.recorder = strategy, evaluator, recorder
        self.objectives = objectives
        self.hurdles = hurdles
        self.rung_values: list[list[float]] = [[] for _ in range(hurdles.rungs if hurdles
                                                                 else 1)]
        for rung, value in rung_history:
            if rung < len(self.rung_values) and math.isfinite(value):
                self.rung_values[rung].append(value)
        self.cleared: dict[int, dict] = {}  # promoted and continuing: the rung result so far
        # Finished a rung before it had a bar: (candidate id, result), judged once it has one.
        self.waiting: list[list[tuple[int, dict]]] = [[] for _ in self.rung_values]
        self.limits, self.clock, self.on_tick, self.poll = limits, clock, on_tick, poll_seconds
        self.report = SearchReport()
        self.proposals: dict[int, Proposal] = {}
        self.durations: dict[int, list[float]] = {}  # rung -> seconds each finished one took
        self.start = self.deadline = 0.0
        # The FLOPs budget. A candidate in flight holds its full budget's FLOPs, so a hurdled
        # one can continue; once it stops, what it trained is what it holds. One waiting for a
        # rung's bar holds what it trained (the first few of a rung would otherwise hold the
        # budget idle), and continues only if its full budget fits again.
        self.flops_of = train_flops
        self.flops_spent = 0.0  # finished: earlier sessions' and this one's
        self.flops_held: dict[int, float] = {}  # candidate id -> its full budget's FLOPs
        self.waiting_proposal: Proposal | None = None  # asked, but the FLOPs were held

    @property
    def flops_committed(self) -> float:
        return self.flops_spent + sum(self.flops_held.values())

    # ------------------------------------------------------------------ limits
    def _expected_seconds(self, rung: int) -> float:
        """How long training ``rung`` will take: the median of that rung so far, else the first
        rung's median scaled by the steps the rung adds (a rung-2 continuation is 6x rung 0)."""
        if self.durations.get(rung):
            return statistics.median(self.durations[rung])
        if rung and self.durations.get(0):
            return statistics.median(self.durations[0]) * self.hurdles.relative_cost(rung)
        return 0.0

    def _time_reason(self, rung: int = 0) -> str | None:
        """Why training from ``rung`` on must not start: it would not reach the full budget (the
        last rung) before the deadline. A candidate cut short at an early rung is ranked below
        every one that went further and cannot be the search's winner, so a rung that cannot be
        followed through is compute spent on nothing (up to a tenth of a bench run's)."""
        if self.limits.wall_seconds is not None:
            last = self.hurdles.rungs if self.hurdles else 1
            needed = sum(self._expected_seconds(r) for r in range(rung, last))
            if self.clock() + needed > self.deadline:
                return "the time budget would be overrun before another candidate's full budget"
        return None

    def _stop_reason(self, launched_total: int) -> str | None:
        limits = self.limits
        if limits.max_candidates is not None and launched_total >= limits.max_candidates:
            return f"reached {limits.max_candidates} candidates"
        return self._time_reason()

    def _full_flops(self, genome: Genome) -> float:
        return self.flops_of(genome, self.hurdles.rungs - 1 if self.hurdles else 0)

    def _flops_reason(self) -> str:
        return (f"the compute budget ({self.limits.train_flops:.3g} training FLOPs) has no room "
                f"for another candidate's full budget")

    def _affordable(self, proposal: Proposal) -> bool | None:
        """Whether ``proposal``'s full budget fits in the FLOPs left (True without a FLOPs budget,
        or when its genome has a result already and costs nothing); None: not now, but it may
        once a hurdled candidate in flight stops early and gives back what it held."""
        if self.limits.train_flops is None or self.recorder.lookup(proposal.genome.key):
            return True
        if self.flops_committed + self._full_flops(proposal.genome) <= self.limits.train_flops:
            return True
        return None if self.hurdles and self.evaluator.in_flight() else False

    def run(self, already_launched: int = 0, relaunch: list[tuple[int, Proposal]] = (),
            already_flops: float = 0.0) -> SearchReport:
        """Run until a limit. ``already_launched``: candidates of earlier sessions (resume);
        ``relaunch``: candidates that were in flight when an earlier session stopped;
        ``already_flops``: the training FLOPs earlier sessions spent."""
        self.start = self.clock()
        self.flops_spent = already_flops
        self.deadline = self.start + (self.limits.wall_seconds or math.inf)
        launched_total = already_launched
        queue = list(relaunch)
        stopping = False
        while True:
            while not stopping and self.evaluator.in_flight() < self.evaluator.slots:
                # Candidates owed by an earlier session come first; they are already counted.
                reason = self._time_reason() if queue else self._stop_reason(launched_total)
                if reason is None and queue:
                    affordable = self._affordable(queue[0][1])
                    if affordable:
                        self._launch(*queue.pop(0))
                        continue
                    if affordable is None:  # wait for a result to give FLOPs back
                        break
                    reason = self._flops_reason()
                proposal, self.waiting_proposal = (
                    None if reason else self.waiting_proposal or self.strategy.ask()), None
                if proposal is not None and self.limits.max_generations is not None \
                        and proposal.generation > self.limits.max_generations:
                    reason = f"reached generation {self.limits.max_generations}"
                if proposal is not None and not reason:
                    affordable = self._affordable(proposal)
                    if affordable is None:  # wait for a result to give FLOPs back
                        self.waiting_proposal = proposal
                        break
                    if not affordable:
                        reason = self._flops_reason()
                if reason:
                    stopping, self.report.stop_reason = True, reason
                    break
                launched_total += 1
                self._launch_or_reuse(proposal)
            if self.evaluator.in_flight() == 0:
                if not stopping and self.evaluator.slots == 0:
                    self.report.stop_reason = "no worker is left to train candidates"
                break
            if self.clock() >= self.deadline:
                for candidate_id in self.evaluator.cancel_all():
                    if candidate_id in self.cleared:  # it has a result: its last rung's
                        self._final(candidate_id, self.cleared.pop(candidate_id))
                        continue
                    self.recorder.record_cancelled(candidate_id, "time budget reached")
                    self.report.cancelled += 1
                self.report.stop_reason = "time budget reached"
                break
            timeout = min(self.poll, max(0.0, self.deadline - self.clock()))
            finished = self.evaluator.next_result(timeout)
            if finished is not None:
                self._finish(*finished)
            if self.on_tick:
                self.on_tick()
        for waiting in self.waiting:  # rungs that never got their bar: no continuation
            for candidate_id, result in waiting:
                self._stop(candidate_id, result)
            waiting.clear()
        self.report.seconds = self.clock() - self.start
        return self.report

    # ------------------------------------------------------------------ steps
    def _launch_or_reuse(self, proposal: Proposal) -> None:
        record = proposal_record(proposal)
        known = self.recorder.lookup(proposal.genome.key)
        if known is not None:  # never train a genome twice
            source_id, result = known
            candidate_id = self.recorder.record_reused(record, source_id, result)
            self.strategy.tell(candidate_id, proposal, self._fitness(result),
                               rung=result.get("rung", 0))
            self.report.reused += 1
            return
        candidate_id = self.recorder.record_proposal(record)
        reason = self.evaluator.rejection(proposal.genome)
        if reason is not None:  # rejected before launch, so no worker is lost to it
            self.recorder.record_result(candidate_id, {"status": REJECTED, "error": reason})
            self.strategy.tell(candidate_id, proposal, self._fitness({"status": REJECTED}))
            self.report.rejected += 1
            self._count(REJECTED)
            return
        self._launch(candidate_id, proposal)

    def _launch(self, candidate_id: int, proposal: Proposal) -> None:
        self.proposals[candidate_id] = proposal
        if self.limits.train_flops is not None:
            self.flops_held[candidate_id] = self._full_flops(proposal.genome)
        self.evaluator.submit(candidate_id, proposal.genome)
        self.recorder.record_start(candidate_id, self.evaluator.running().get(candidate_id, ""))
        self.report.launched += 1

    def _finish(self, candidate_id: int, result: dict) -> None:
        rung = result.get("rung", 0)
        self.durations.setdefault(rung, []).append(result.get("wall_seconds", 0.0))
        if self.hurdles is None:
            self._final(candidate_id, result)
            return
        self.recorder.record_rung(candidate_id, rung, result)
        fitness = fitness_of(result)
        if not math.isfinite(fitness) or rung + 1 == self.hurdles.rungs:
            self._stop(candidate_id, result)
            return
        values = self.rung_values[rung]
        values.append(fitness)
        if not self.hurdles.has_bar(values):
            # No bar yet. Letting the first few through would spend the next rungs on whatever
            # came first (early random samples, mostly); they wait for the bar instead, as
            # asynchronous successive halving promotes only from a rung's top fraction.
            self.waiting[rung].append((candidate_id, result))
            if candidate_id in self.flops_held:  # idle until judged: hold only what it trained
                self.flops_held[candidate_id] = result.get("train_flops") or 0.0
            return
        self._judge(candidate_id, result, values)
        if self.waiting[rung]:  # the bar has just been set: judge those that waited for it
            for waiting_id, waiting_result in self.waiting[rung]:
                self._judge(waiting_id, waiting_result, values)
            self.waiting[rung].clear()

    def _judge(self, candidate_id: int, result: dict, rung_values: list[float]) -> None:
        """Continue the candidate to the next rung if it clears this one's hurdle and the
        continuation can finish in time and within the FLOPs budget; otherwise its result so far
        is final."""
        rung = result.get("rung", 0)
        # The FLOPs room check last: it re-holds the full budget for a candidate that goes on.
        if self._time_reason(rung + 1) is None and \
                self.hurdles.clears(rung_values, fitness_of(result)) and \
                self._flops_room(candidate_id):
            self.evaluator.submit(candidate_id, self.proposals[candidate_id].genome, rung + 1)
            self.cleared[candidate_id] = result
            self.report.promoted += 1
        else:
            self._stop(candidate_id, result)

    def _flops_room(self, candidate_id: int) -> bool:
        """Whether the candidate can hold its full budget's FLOPs again (it holds them already
        unless it waited for a rung's bar), and holds them if so."""
        if self.limits.train_flops is None:
            return True
        full = self._full_flops(self.proposals[candidate_id].genome)
        if self.flops_committed - self.flops_held[candidate_id] + full > self.limits.train_flops:
            return False
        self.flops_held[candidate_id] = full
        return True

    def _stop(self, candidate_id: int, result: dict) -> None:
        """A hurdled candidate goes no further: drop its checkpoint; its last result is final."""
        self.cleared.pop(candidate_id, None)
        self.evaluator.release(candidate_id)
        self._final(candidate_id, result)

    def _final(self, candidate_id: int, result: dict) -> None:
        proposal = self.proposals.pop(candidate_id)
        if self.flops_held.pop(candidate_id, None) is not None:
            self.flops_spent += result.get("train_flops") or 0.0
        self.recorder.record_result(candidate_id, result)
        self.strategy.tell(candidate_id, proposal, self._fitness(result),
                           rung=result.get("rung", 0))
        self.report.completed += 1
        self._count(result.get("status", "failed"))

    def _fitness(self, result: dict):
        return self.objectives.of(result) if self.objectives else fitness_of(result)

    def _count(self, status: str) -> None:
        self.report.statuses[status] = self.report.statuses.get(status, 0) + 1


class InProcessEvaluator:
    """Trains candidates one at a time in this process, when their result is asked for.

    With one slot the search is strictly ask, train, tell: deterministic for a given seed."""

    def __init__(self, train: Callable[[Genome, int, int], dict], slots: int = 1,
                 reject: Callable[[Genome], str | None] | None = None,
                 release: Callable[[int], None] | None = None) -> None:
        """``train(genome, candidate_id, rung)`` -> the result as plain data."""
        self.train, self.slots, self.reject, self._release = train, slots, reject, release
        self.queue: list[tuple[int, Genome, int]] = []

    def rejection(self, genome: Genome) -> str | None:
        return self.reject(genome) if self.reject else None

    def release(self, candidate_id: int) -> None:
        if self._release:
            self._release(candidate_id)

    def submit(self, candidate_id: int, genome: Genome, rung: int = 0) -> None:
        self.queue.append((candidate_id, genome, rung))

    def next_result(self, timeout: float | None) -> tuple[int, dict] | None:
        if not self.queue:
            return None
        candidate_id, genome, rung = self.queue.pop(0)
        return candidate_id, self.train(genome, candidate_id, rung)

    def in_flight(self) -> int:
        return len(self.queue)

    def running(self) -> dict[int, str]:
        return {candidate_id: "in-process" for candidate_id, _, _ in self.queue}

    def cancel_all(self) -> list[int]:
        cancelled = [candidate_id for candidate_id, _, _ in self.queue]
        self.queue.clear()
        return cancelled
