"""Non-dominated sorting and crowding on hand-made fronts (every objective minimised)."""

import math
import random

from search.pareto import crowding_distance, dominates, non_dominated_sort, pareto_front


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    assert dominates((1, 2), (2, 2)) and dominates((1, 1), (2, 3))
    assert not dominates((1, 2), (1, 2))  # equal points do not dominate each other
    assert not dominates((1, 3), (2, 2)) and not dominates((2, 2), (1, 3))  # a trade-off


def test_hand_made_fronts():
    # bpb, params (millions): three layers of trade-offs and a duplicate
    points = [(1.0, 4.0), (2.0, 2.0), (4.0, 1.0),  # front 0
              (2.0, 4.0), (3.0, 3.0), (5.0, 2.0),  # front 1
              (5.0, 5.0),                           # front 2
              (2.0, 2.0)]                           # equal to point 1: same front
    fronts = non_dominated_sort(points)
    assert [sorted(f) for f in fronts] == [[0, 1, 2, 7], [3, 4, 5], [6]]
    assert sorted(pareto_front(points)) == [0, 1, 2, 7]


def test_three_objectives_and_a_single_point():
    points = [(1, 1, 9), (1, 9, 1), (9, 1, 1), (2, 2, 9), (9, 9, 9)]
    assert [sorted(f) for f in non_dominated_sort(points)] == [[0, 1, 2], [3], [4]]
    assert non_dominated_sort([(3.0, 1.0)]) == [[0]] and pareto_front([]) == []


def test_sorting_agrees_with_the_definition_on_random_points():
    rng = random.Random(0)
    points = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(60)]
    fronts = non_dominated_sort(points)
    assert sorted(i for f in fronts for i in f) == list(range(60))  # a partition
    for rank, front in enumerate(fronts):
        for i in front:  # nothing in its own or a later front dominates it
            later = [j for f in fronts[rank:] for j in f]
            assert not any(dominates(points[j], points[i]) for j in later)
            if rank:  # and something in the front just before does
                assert any(dominates(points[j], points[i]) for j in fronts[rank - 1])


def test_crowding_keeps_the_extremes_and_prefers_isolated_points():
    points = [(0.0, 10.0), (1.0, 9.0), (1.2, 8.8), (5.0, 5.0), (10.0, 0.0)]
    distance = crowding_distance(points, [0, 1, 2, 3, 4])
    assert distance[0] == distance[4] == math.inf
    assert distance[3] > distance[1] > 0 and distance[3] > distance[2]
    assert crowding_distance(points, [1, 3]) == {1: math.inf, 3: math.inf}
