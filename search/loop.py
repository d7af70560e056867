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

The loop itself only dispatches: ``search.budget.ComputeBudget`` keeps the time and FLOPs
accounts, ``search.scheduler.HurdleScheduler`` decides what becomes of a candidate that finished
a hurdle rung.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from search.budget import Affordable, ComputeBudget
from search.evolution import Proposal
from search.genome import Genome
from search.hurdles import Hurdles
from search.objectives import Objectives, fitness_of
from search.scheduler import Decision, HurdleScheduler, Judgement
from trainers.candidate import Status

REJECTED = Status.REJECTED.value  # the status of a candidate no worker could train


class Strategy(Protocol):
    def ask(self) -> Proposal | None:
        """The next candidate to train, or None when the strategy has nothing to propose now."""

    def tell(self, candidate_id: int, proposal: Proposal, fitness: float | tuple[float, ...],
             rung: int = 0) -> None:
        """``fitness`` of a finished candidate; ``rung``: the furthest hurdle rung it reached
        (strategies that ignore hurdles may ignore it)."""

    def reseed(self, seed_text: str) -> None:
        """Draw fresh randomness from ``seed_text`` from now on (a resumed search, after its
        history was told, so it does not repeat the proposals of the session before)."""

    def mark_seen(self, genome_key: str) -> None:
        """The genome is taken (in flight elsewhere, e.g. relaunched on resume): do not
        propose it again."""

    def plan(self, expected_candidates: int) -> None:
        """The search is expected to launch ``expected_candidates`` in all, at the pace so far
        (called before each proposal once an estimate exists): a strategy whose population
        follows the budget sizes it to that; others ignore it."""


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

    def close(self) -> None:
        """The search is over: free the workers and whatever else the evaluator holds."""


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
    continued: int = 0  # continuations to a higher hurdle rung
    cancelled: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""
    seconds: float = 0.0


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
                 train_flops: Callable[[Genome, int], float] | None = None,
                 candidate_seconds: float | None = None) -> None:
        """``candidate_seconds``: how long a candidate trains, when its budget is a time (then
        even the first is launched only if it fits what is left).
        ``hurdles``: train every candidate in budget rungs, continuing only those that clear
        each rung's hurdle (the evaluator must support ``rung``); ``rung_history``: the (rung,
        bits per byte) results of an earlier session, which keep setting the bars on resume.
        ``objectives``: what the strategy is told (default: bits per byte alone).
        ``train_flops(genome, rung)``: the FLOPs of training ``genome`` from scratch to the end
        of ``rung`` (needed by a ``limits.train_flops`` budget)."""
        self.strategy, self.evaluator, self.recorder = strategy, evaluator, recorder
        self.limits, self.objectives = limits, objectives
        self.on_tick, self.poll = on_tick, poll_seconds
        self.budget = ComputeBudget(limits.wall_seconds, limits.train_flops, train_flops,
                                    hurdles, clock, candidate_seconds)
        self.scheduler = HurdleScheduler(hurdles, rung_history) if hurdles else None
        self.report = SearchReport()
        self.proposals: dict[int, Proposal] = {}  # candidate id -> its proposal, until final
        self.launched_total = 0  # candidates launched, earlier sessions' included
        self.owed: list[tuple[int, Proposal]] = []  # in flight when an earlier session stopped
        self.deferred: Proposal | None = None  # asked, but waiting for FLOPs to be given back
        self.stopping = False  # a limit was reached: nothing more is launched

    @property
    def flops_spent(self) -> float:
        """The training FLOPs of finished candidates, earlier sessions' included."""
        return self.budget.spent

    def run(self, already_launched: int = 0, relaunch: list[tuple[int, Proposal]] = (),
            already_flops: float = 0.0) -> SearchReport:
        """Run until a limit. ``already_launched``: candidates of earlier sessions (resume);
        ``relaunch``: candidates that were in flight when an earlier session stopped;
        ``already_flops``: the training FLOPs earlier sessions spent."""
        self.budget.start(already_flops)
        self.launched_total = already_launched
        self.owed = list(relaunch)
        self.stopping = False
        while True:
            self._fill_free_slots()
            if self.evaluator.in_flight() == 0:
                self._note_idle()
                break
            if self.budget.expired():
                self._cancel_at_deadline()
                break
            self._wait_for_a_result()
            if self.on_tick:
                self.on_tick()
        self._stop_the_waiting()
        self.report.seconds = self.budget.elapsed()
        return self.report

    # ------------------------------------------------------------------ the main loop's steps
    def _fill_free_slots(self) -> None:
        """Launch candidates while a worker is free: first those an earlier session owes, then
        new proposals, until a limit stops the search or the FLOPs must be waited for."""
        while not self.stopping and self.evaluator.in_flight() < self.evaluator.slots:
            launched = self._relaunch_owed() if self.owed else self._launch_a_proposal()
            if not launched:
                break

    def _relaunch_owed(self) -> bool:
        """Relaunch the first candidate an earlier session left unfinished (counted already
        among the launched); whether it was launched."""
        reason = self.budget.time_reason()
        if reason is None:
            candidate_id, proposal = self.owed[0]
            affordable = self._affordable(proposal)
            if affordable is Affordable.YES:
                self.owed.pop(0)
                self._launch(candidate_id, proposal)
                return True
            if affordable is Affordable.LATER:  # wait for a result to give FLOPs back
                return False
            reason = self.budget.flops_reason
        self._stop_launching(reason)
        return False

    def _launch_a_proposal(self) -> bool:
        """Launch (or reuse the result of) the strategy's next proposal, unless a limit stops
        the search or its FLOPs must be waited for; whether it was launched."""
        reason = self._limit_reason()
        if reason is not None:
            self._stop_launching(reason)
            return False
        proposal = self._next_proposal()
        if proposal is None:  # nothing to propose now
            return False
        reason = self._generation_reason(proposal)
        if reason is None:
            affordable = self._affordable(proposal)
            if affordable is Affordable.LATER:  # wait for a result to give FLOPs back
                self.deferred = proposal
                return False
            if affordable is Affordable.NEVER:
                reason = self.budget.flops_reason
        if reason is not None:
            self._stop_launching(reason)
            return False
        self.launched_total += 1
        self._launch_or_reuse(proposal)
        return True

    def _next_proposal(self) -> Proposal | None:
        """The proposal deferred for want of FLOPs, if any; else the strategy's next."""
        proposal = self.deferred
        self.deferred = None
        if proposal is None:
            self._plan()
            proposal = self.strategy.ask()
        return proposal

    def _plan(self) -> None:
        """Tell the strategy how many candidates the search is expected to launch in all."""
        expected = self.budget.expected_candidates(self.launched_total, self.evaluator.slots)
        if self.limits.max_candidates is not None:
            expected = min(expected or self.limits.max_candidates, self.limits.max_candidates)
        if expected is not None:
            self.strategy.plan(expected)

    def _stop_launching(self, reason: str) -> None:
        self.stopping = True
        self.report.stop_reason = reason

    def _note_idle(self) -> None:
        """Nothing is in flight, and nothing more was launched: say why, unless a limit did."""
        if self.stopping:
            return
        self.report.stop_reason = ("no worker is left to train candidates"
                                   if self.evaluator.slots == 0
                                   else "the strategy has nothing more to propose")

    def _cancel_at_deadline(self) -> None:
        """Cancel what is still training; a continuing candidate keeps its last rung's result."""
        for candidate_id in self.evaluator.cancel_all():
            cleared = self.scheduler.drop(candidate_id) if self.scheduler else None
            if cleared is not None:
                self._final(candidate_id, cleared)
                continue
            self.recorder.record_cancelled(candidate_id, "time budget reached")
            self.report.cancelled += 1
        self.report.stop_reason = "time budget reached"

    def _wait_for_a_result(self) -> None:
        finished = self.evaluator.next_result(min(self.poll, self.budget.seconds_left()))
        if finished is not None:
            self._finish(*finished)

    def _stop_the_waiting(self) -> None:
        """Rungs that never got their bar: their waiting candidates do not continue."""
        if self.scheduler:
            for candidate_id, result in self.scheduler.drain_waiting():
                self._stop(candidate_id, result)

    # ------------------------------------------------------------------ limits
    def _limit_reason(self) -> str | None:
        """Why no new candidate may start (a number of candidates, the time), or None."""
        limits = self.limits
        if limits.max_candidates is not None and self.launched_total >= limits.max_candidates:
            return f"reached {limits.max_candidates} candidates"
        return self.budget.time_reason()

    def _generation_reason(self, proposal: Proposal) -> str | None:
        limit = self.limits.max_generations
        if limit is not None and proposal.generation > limit:
            return f"reached generation {limit}"
        return None

    def _affordable(self, proposal: Proposal) -> Affordable:
        """Whether ``proposal``'s full budget fits in the FLOPs left; one whose genome has a
        result already costs nothing (it is reused, not trained)."""
        if self.budget.counts_flops and self.recorder.lookup(proposal.genome.key) is None:
            return self.budget.affordable(proposal.genome, self.evaluator.in_flight())
        return Affordable.YES

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
        self.budget.hold(candidate_id, proposal.genome)
        self.evaluator.submit(candidate_id, proposal.genome)
        self.recorder.record_start(candidate_id, self.evaluator.running().get(candidate_id, ""))
        self.report.launched += 1

    def _finish(self, candidate_id: int, result: dict) -> None:
        rung = result.get("rung", 0)
        self.budget.record_duration(rung, result.get("wall_seconds", 0.0))
        if self.scheduler is None:
            self._final(candidate_id, result)
            return
        self.recorder.record_rung(candidate_id, rung, result)
        for judgement in self.scheduler.judge(candidate_id, result):
            self._carry_out(judgement)

    def _carry_out(self, judgement: Judgement) -> None:
        """Act on the scheduler's decision for a finished rung. A candidate that cleared its
        hurdle continues only if the continuation can finish in time and within the FLOPs
        budget; a stopped one's result so far is final."""
        candidate_id, result = judgement.candidate_id, judgement.result
        if judgement.decision is Decision.WAIT:  # idle until judged: hold only what it trained
            self.budget.hold_trained(candidate_id, result.get("train_flops") or 0.0)
        elif judgement.decision is Decision.CONTINUE and self._can_continue(judgement):
            self._continue(judgement)
        else:
            self._stop(candidate_id, result)

    def _can_continue(self, judgement: Judgement) -> bool:
        # The FLOPs check last: it holds the full budget again for a candidate that goes on.
        genome = self.proposals[judgement.candidate_id].genome
        return self.budget.time_reason(judgement.rung + 1) is None and \
            self.budget.hold_full_again(judgement.candidate_id, genome)

    def _continue(self, judgement: Judgement) -> None:
        candidate_id = judgement.candidate_id
        self.evaluator.submit(candidate_id, self.proposals[candidate_id].genome,
                              judgement.rung + 1)
        self.scheduler.mark_continued(candidate_id, judgement.result)
        self.report.continued += 1

    def _stop(self, candidate_id: int, result: dict) -> None:
        """A hurdled candidate goes no further: drop its checkpoint; its last result is final."""
        self.scheduler.drop(candidate_id)
        self.evaluator.release(candidate_id)
        self._final(candidate_id, result)

    def _final(self, candidate_id: int, result: dict) -> None:
        proposal = self.proposals.pop(candidate_id)
        self.budget.settle(candidate_id, result.get("train_flops") or 0.0)
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

    def close(self) -> None:
        """Nothing to free: training happens in this process, one call at a time."""
