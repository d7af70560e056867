"""The compute budget on its own, without a search loop: the deadline and the time each rung is
expected to take, and the FLOPs a candidate holds, gives back and spends."""

import math

import pytest

from search.budget import Affordable, ComputeBudget
from search.genome import Genome
from search.hurdles import Hurdles

STEPS = (10, 30, 90)  # Hurdles(rungs=3, factor=3): rung r ends at these steps


def _genome(d_model=64):
    return Genome(d_model=d_model, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2.0,
                  recurrence_ratio=1, window_size=16, dropout=0.0)


def _flops(genome, rung):
    return float(genome.d_model * STEPS[rung])


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_without_limits_everything_fits_and_nothing_is_held():
    budget = ComputeBudget()
    budget.start()
    assert budget.deadline == math.inf and not budget.expired()
    assert budget.time_reason() is None and not budget.counts_flops
    assert budget.affordable(_genome()) is Affordable.YES
    budget.hold(1, _genome())
    assert budget.held == {} and budget.hold_full_again(1, _genome())
    budget.settle(1, 500.0)
    assert budget.spent == 0.0  # nothing was held: nothing is counted


def test_the_deadline_and_the_seconds_left():
    clock = _Clock()
    clock.now = 100.0
    budget = ComputeBudget(wall_seconds=30, clock=clock)
    budget.start()
    assert budget.deadline == 130.0 and budget.seconds_left() == 30.0
    clock.now = 125.0
    assert budget.elapsed() == 25.0 and not budget.expired()
    clock.now = 131.0
    assert budget.expired() and budget.seconds_left() == 0.0


def test_expected_seconds_are_the_rung_median_or_rung_zero_scaled():
    budget = ComputeBudget(hurdles=Hurdles(rungs=3, factor=3))
    assert budget.expected_seconds(0) == 0.0  # nothing finished yet: no estimate
    for seconds in (8.0, 12.0, 10.0):
        budget.record_duration(0, seconds)
    assert budget.expected_seconds(0) == 10.0
    # Rung 2 adds 6 first rungs' steps (90 - 30 = 60 = 6 x 10) until one has finished it.
    assert budget.expected_seconds(2) == 60.0
    budget.record_duration(2, 50.0)
    assert budget.expected_seconds(2) == 50.0


def test_no_training_starts_that_could_not_reach_the_full_budget():
    clock = _Clock()
    budget = ComputeBudget(wall_seconds=100, hurdles=Hurdles(rungs=3, factor=3), clock=clock)
    budget.start()
    budget.record_duration(0, 10.0)  # rungs take 10, 20 and 60 seconds: 90 in all
    assert budget.time_reason() is None
    clock.now = 20.0  # 80 left: a new candidate's 90 would overrun, a rung 1's 80 would not
    assert "overrun" in budget.time_reason()
    assert budget.time_reason(rung=1) is None
    clock.now = 21.0
    assert "overrun" in budget.time_reason(rung=1)


def test_a_flops_limit_needs_the_flops_of_a_genome():
    with pytest.raises(ValueError, match="FLOPs budget needs"):
        ComputeBudget(flops_limit=1e12)


def test_a_candidate_fits_or_waits_or_never_fits():
    # Full budget (rung 2): 64 x 90 = 5760 FLOPs a candidate.
    budget = ComputeBudget(flops_limit=12_000.0, flops_of=_flops, hurdles=Hurdles(rungs=3))
    budget.start(already_flops=500.0)
    genome = _genome()
    assert budget.full_flops(genome) == 5760.0
    assert budget.affordable(genome) is Affordable.YES
    budget.hold(1, genome)
    assert budget.committed == 500.0 + 5760.0
    assert budget.affordable(genome, in_flight=1) is Affordable.LATER  # 1 may give some back
    assert budget.affordable(genome, in_flight=0) is Affordable.NEVER
    assert "compute budget" in budget.flops_reason
    # Without hurdles nothing in flight stops early, so nothing is given back: never.
    plain = ComputeBudget(flops_limit=900.0, flops_of=_flops)
    plain.hold(1, genome)  # 640 of 900
    assert plain.affordable(genome, in_flight=1) is Affordable.NEVER


def test_a_stopped_candidate_spends_what_it_trained_and_gives_back_the_rest():
    budget = ComputeBudget(flops_limit=12_000.0, flops_of=_flops, hurdles=Hurdles(rungs=3))
    budget.start()
    budget.hold(1, _genome())
    budget.settle(1, 640.0)  # stopped after rung 0
    assert budget.spent == 640.0 and budget.held == {} and budget.committed == 640.0
    budget.settle(1, 640.0)  # settled once only
    assert budget.spent == 640.0


def test_a_waiting_candidate_holds_what_it_trained_and_continues_only_if_it_fits_again():
    budget = ComputeBudget(flops_limit=7000.0, flops_of=_flops, hurdles=Hurdles(rungs=3))
    budget.start()
    genome = _genome()
    budget.hold(1, genome)
    budget.hold_trained(1, 640.0)  # waiting for its rung's bar
    assert budget.committed == 640.0
    budget.hold_trained(2, 99.0)  # never launched: holds nothing
    assert 2 not in budget.held
    budget.hold(3, genome)  # 640 + 5760 = 6400 of 7000
    assert not budget.hold_full_again(1, genome)  # 5760 + 5760 > 7000
    assert budget.held[1] == 640.0
    budget.settle(3, 640.0)  # 3 stopped early: 1280 committed
    assert budget.hold_full_again(1, genome) and budget.held[1] == 5760.0
