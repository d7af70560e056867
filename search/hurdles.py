"""Progressive hurdles: successive halving across budget rungs, decided as results arrive.

Every new candidate first trains the rung-0 budget. When it finishes rung r (not the last), it
continues to rung r + 1, from its checkpoint, if its validation bits per byte clears rung r's
hurdle: the ``keep_fraction`` quantile of every rung-r result so far (itself included), or with
``window`` of the last ``window`` of them. A population that improves clears a bar set by its
early, random members more and more easily; a window keeps the bar moving with it, as So et
al.'s hurdle (the population's mean) does. The first ``min_results`` results at a rung set its
bar (as in So et al.'s progressive dynamic hurdles, where the hurdle is computed from earlier
candidates): those candidates wait, checkpoint kept, until the bar exists and are then judged by
it like every later one, so only the best of them go on (as asynchronous successive halving
continues only a rung's top fraction). Letting them all through would spend the longer
rungs on whatever finished first, early random samples mostly.
The rungs' budgets grow by ``factor``: with 3 rungs and factor 2, 1x, 2x and 4x the base budget,
all on one learning-rate schedule spanning the last rung, so continuing equals training that
long from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Hurdles:
    rungs: int = 3
    factor: float = 2.0  # a first rung of a quarter of the budget: see BENCHMARKS.md
    keep_fraction: float = 1 / 3
    min_results: int = 3
    window: int | None = None  # the bar is set by a rung's last `window` results (None: all)

    def __post_init__(self) -> None:
        if self.rungs < 1:
            raise ValueError(f"rungs must be at least 1, got {self.rungs}")
        if self.factor <= 1:
            raise ValueError(f"factor must be above 1, got {self.factor}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.window is not None and self.window < max(1, self.min_results):
            raise ValueError(f"window must be at least min_results ({self.min_results}), "
                             f"got {self.window}")

    def steps(self, base_steps: int) -> tuple[int, ...]:
        """Total steps reached at the end of each rung."""
        return tuple(max(1, round(base_steps * self.factor ** r)) for r in range(self.rungs))

    def relative_cost(self, rung: int) -> float:
        """The steps rung ``rung`` adds, as a multiple of the first rung's (factor 3: 1, 2, 6)."""
        return self.factor ** rung - (self.factor ** (rung - 1) if rung else 0.0)

    def has_bar(self, rung_values: list[float]) -> bool:
        """Are there enough results at a rung (``rung_values``) to set its hurdle?"""
        return len(rung_values) >= self.min_results

    def clears(self, rung_values: list[float], value: float) -> bool:
        """Does ``value`` (lower is better) clear a rung whose results so far, in the order they
        arrived, are ``rung_values`` (``value`` among them)? Without a bar (``has_bar``), no."""
        if not self.has_bar(rung_values):
            return False
        ranked = sorted(rung_values[-self.window:] if self.window else rung_values)
        kept = max(1, math.ceil(len(ranked) * self.keep_fraction))
        return value <= ranked[kept - 1]
