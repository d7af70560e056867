"""Pareto fronts for several objectives at once, every objective minimised (negate the ones to
maximise, e.g. tokens/s).

``non_dominated_sort`` is Deb et al.'s fast non-dominated sort (NSGA-II): front 0 holds the
points nothing dominates, front 1 those dominated only by front 0, and so on.
``crowding_distance`` ranks points inside one front by how isolated they are, so selection can
prefer the ends and the sparse stretches of a front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b))


def non_dominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """Indices of ``points`` grouped into fronts, best front first (O(objectives * n^2))."""
    n = len(points)
    dominated_by_me: list[list[int]] = [[] for _ in range(n)]
    dominating_count = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by_me[i].append(j)
                dominating_count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by_me[j].append(i)
                dominating_count[i] += 1
    fronts = []
    current = [i for i in range(n) if dominating_count[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominated_by_me[i]:
                dominating_count[j] -= 1
                if dominating_count[j] == 0:
                    following.append(j)
        current = sorted(following)
    return fronts


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates."""
    return non_dominated_sort(points)[0] if points else []


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """Per index of ``front``: the sum over objectives of the normalised gap between its
    neighbours; the extremes of each objective get infinity (always kept)."""
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for objective in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: points[i][objective])
        low, high = points[ordered[0]][objective], points[ordered[-1]][objective]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for before, here, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[here] += (points[after][objective] - points[before][objective]) / (high - low)
    return distance
