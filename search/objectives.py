"""What a search optimises: one objective (validation bits per byte, the default) or several at
once, each turned into a number to minimise. With several, strategies select by Pareto rank
(``search.pareto``) instead of by one number."""

from __future__ import annotations

import math
from dataclasses import dataclass

FAILED_FITNESS = math.inf

# name: (result field, sign): the sign makes every objective one to minimise
OBJECTIVES = {
    "bpb": ("val_bpb", 1.0),  # validation bits per byte
    "params": ("params", 1.0),  # total parameters
    "throughput": ("tokens_per_second", -1.0),  # measured training tokens/s, higher is better
}


def fitness_of(result: dict) -> float:
    """A result's validation bits per byte; infinite unless it finished ok."""
    value = result.get("val_bpb")
    return value if result.get("status") == "ok" and value is not None else FAILED_FITNESS


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...] = ("bpb",)

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in OBJECTIVES]
        if unknown or not self.names:
            raise ValueError(f"unknown objective(s) {', '.join(unknown) or '(none)'}: choose "
                             f"from {', '.join(OBJECTIVES)}")
        if self.names[0] != "bpb":
            raise ValueError("the first objective must be bpb (hurdles and the leaderboard "
                             "rank by it)")

    @classmethod
    def parse(cls, text: str) -> Objectives:
        """``"bpb,params"`` -> Objectives(("bpb", "params"))."""
        return cls(tuple(part.strip() for part in text.split(",") if part.strip()))

    def of(self, result: dict) -> tuple[float, ...]:
        """The result's objective values, each to minimise; all infinite unless it finished ok."""
        if result.get("status") != "ok":
            return (math.inf,) * len(self.names)
        values = []
        for name in self.names:
            field, sign = OBJECTIVES[name]
            value = result.get(field)
            values.append(math.inf if value is None else sign * float(value))
        return tuple(values)
