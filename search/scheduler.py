"""Hurdle scheduling: what becomes of a candidate that finished a budget rung.

``HurdleScheduler`` keeps each rung's results (which set its hurdle, ``search.hurdles``), the
candidates waiting for a rung's bar, and those continuing to a higher rung. For each rung result
it decides: continue to the next rung (it cleared the hurdle), wait (the rung has no bar yet:
judged once it has one) or stop (failed, reached the last rung, or did not clear). A
continuation may still be refused by the compute budget; the caller checks that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from search.hurdles import Hurdles
from search.objectives import fitness_of


class Decision(Enum):
    CONTINUE = "continue"  # cleared its rung's hurdle: may train the next rung
    WAIT = "wait"  # its rung has no bar yet: judged once it has one
    STOP = "stop"  # failed, finished the last rung, or did not clear the hurdle


@dataclass(frozen=True)
class Judgement:
    candidate_id: int
    result: dict  # of the rung it finished
    decision: Decision

    @property
    def rung(self) -> int:
        return self.result.get("rung", 0)


class HurdleScheduler:
    def __init__(self, hurdles: Hurdles, rung_history: list[tuple[int, float]] = ()) -> None:
        """``rung_history``: the (rung, bits per byte) results of an earlier session, in the
        order they arrived, which keep setting the bars on resume."""
        self.hurdles = hurdles
        self.rung_values: list[list[float]] = [[] for _ in range(hurdles.rungs)]
        for rung, value in rung_history:
            if rung < len(self.rung_values) and math.isfinite(value):
                self.rung_values[rung].append(value)
        # Finished a rung before it had a bar: (candidate id, result), judged once it has one.
        self.waiting: list[list[tuple[int, dict]]] = [[] for _ in self.rung_values]
        self.cleared: dict[int, dict] = {}  # continuing to a higher rung: the rung result so far

    def judge(self, candidate_id: int, result: dict) -> list[Judgement]:
        """The decisions a rung result makes: its own first, then, if it set its rung's bar,
        those of the candidates that waited for it, in the order they arrived."""
        rung = result.get("rung", 0)
        fitness = fitness_of(result)
        if not math.isfinite(fitness) or rung + 1 == self.hurdles.rungs:
            return [Judgement(candidate_id, result, Decision.STOP)]
        values = self.rung_values[rung]
        values.append(fitness)
        if not self.hurdles.has_bar(values):
            # Letting the first few through would spend the next rungs on whatever came first
            # (early random samples, mostly); they wait for the bar instead, as asynchronous
            # successive halving continues only a rung's top fraction.
            self.waiting[rung].append((candidate_id, result))
            return [Judgement(candidate_id, result, Decision.WAIT)]
        judged = [(candidate_id, result), *self.waiting[rung]]
        self.waiting[rung].clear()
        return [Judgement(judged_id, judged_result, self._verdict(values, judged_result))
                for judged_id, judged_result in judged]

    def _verdict(self, rung_values: list[float], result: dict) -> Decision:
        cleared = self.hurdles.clears(rung_values, fitness_of(result))
        return Decision.CONTINUE if cleared else Decision.STOP

    def mark_continued(self, candidate_id: int, result: dict) -> None:
        """The candidate trains its next rung; ``result``: of the rung it cleared."""
        self.cleared[candidate_id] = result

    def drop(self, candidate_id: int) -> dict | None:
        """The candidate goes no further: the result of the last rung it cleared, if it was
        continuing to another."""
        return self.cleared.pop(candidate_id, None)

    def drain_waiting(self) -> list[tuple[int, dict]]:
        """The candidates still waiting for a bar (the search is over: none will come), and
        their rung results; none waits afterwards."""
        waiting = [entry for rung in self.waiting for entry in rung]
        for rung in self.waiting:
            rung.clear()
        return waiting
