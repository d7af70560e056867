"""Baseline strategies: random search and Optuna TPE / NSGA-II on the same space and interface."""

import math
import statistics

import optuna
import pytest
from optuna.trial import TrialState

from search.baselines import OptunaSearch, RandomSearch
from search.genome import CPU, preset_seeds


def _score(genome):  # made up: prefers wide, shallow models
    return 2.0 - genome.d_model / 256 + genome.n_layers / 20


def _make(name, seed=0, seeds=()):
    return RandomSearch(CPU, seed, list(seeds)) if name == "random" \
        else OptunaSearch(CPU, name, seed, list(seeds), population_size=8)


def _drive(strategy, count, fail_every=None):
    proposals = []
    for i in range(count):
        proposal = strategy.ask()
        failed = fail_every and i % fail_every == fail_every - 1
        strategy.tell(i, proposal, math.inf if failed else _score(proposal.genome))
        proposals.append(proposal)
    return proposals


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2"])
def test_proposals_are_valid_seeded_first_and_reproducible(name):
    seeds = preset_seeds(CPU)
    proposals = _drive(_make(name, seeds=seeds), 30, fail_every=7)
    assert [p.operator for p in proposals[:len(seeds)]] == ["seed"] * len(seeds)
    assert [p.genome for p in proposals[:len(seeds)]] == [CPU.repair(g) for g in seeds]
    assert all(CPU.repair(p.genome) == p.genome for p in proposals)  # inside the space
    assert all(CPU.params(p.genome) <= CPU.max_params for p in proposals)
    assert len({p.genome.key for p in proposals}) >= 25  # mostly new genomes
    again = _drive(_make(name, seeds=seeds), 30, fail_every=7)
    assert [p.genome for p in again] == [p.genome for p in proposals]  # same seed, same search


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_optuna_sees_failures_as_failed_trials_and_learns(name):
    strategy = _make(name)
    proposals = _drive(strategy, 80, fail_every=9)
    states = [t.state for t in strategy.study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 80 // 9
    assert states.count(optuna.trial.TrialState.COMPLETE) == 80 - 80 // 9
    early = statistics.mean(_score(p.genome) for p in proposals[:20])
    late = statistics.mean(_score(p.genome) for p in proposals[-20:])
    assert late < early  # the sampler moves toward better genomes


def test_optuna_replays_results_of_an_earlier_session():
    first = _make("tpe")
    history = _drive(first, 12)
    resumed = _make("tpe")
    for i, proposal in enumerate(history):  # what build_strategy does on --resume
        resumed.tell(i, proposal, _score(proposal.genome))
    trials = resumed.study.trials
    assert len(trials) == 12 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [t.value for t in trials] == [_score(p.genome) for p in history]
    assert resumed.ask().genome is not None


def _hurdled_drive(strategy, count):
    """Results as hurdles leave them: made-up rungs, the better a genome the further it got
    (rung 2 is the full budget), and a failure now and then."""
    told = []
    for i in range(count):
        proposal = strategy.ask()
        score = _score(proposal.genome)
        fitness, rung = (math.inf, 0) if i % 7 == 6 else (score, 0 if score > 1.6 else
                                                            1 if score > 1.3 else 2)
        strategy.tell(i, proposal, fitness, rung=rung)
        told.append((proposal, fitness, rung))
    return told


def _expected_trial(fitness, rung):
    if not math.isfinite(fitness):
        return TrialState.FAIL, None, {}
    if rung < 2:  # Optuna gives a pruned trial its last intermediate value as its value
        return TrialState.PRUNED, fitness, {rung: fitness}
    return TrialState.COMPLETE, fitness, {}


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_with_hurdles_a_candidate_stopped_early_is_a_pruned_trial_at_its_rung(name):
    strategy = OptunaSearch(CPU, name, 0, population_size=8, final_rung=2)
    told = _hurdled_drive(strategy, 40)
    trials = strategy.study.trials
    assert [(t.state, t.value, t.intermediate_values) for t in trials] == \
        [_expected_trial(fitness, rung) for _, fitness, rung in told]
    assert {rung for _, _, rung in told} == {0, 1, 2}
    # Replayed on resume, the study is the same.
    resumed = OptunaSearch(CPU, name, 0, population_size=8, final_rung=2)
    for i, (proposal, fitness, rung) in enumerate(told):
        resumed.tell(i, proposal, fitness, rung=rung)
    assert [(t.state, t.value, t.intermediate_values) for t in resumed.study.trials] == \
        [(t.state, t.value, t.intermediate_values) for t in trials]


def test_hurdled_tpe_learns_from_complete_and_pruned_trials():
    told = _hurdled_drive(OptunaSearch(CPU, "tpe", 0, population_size=8, final_rung=2), 80)
    scores = [_score(proposal.genome) for proposal, _, _ in told]
    assert statistics.mean(scores[-20:]) < statistics.mean(scores[:20]) - 0.1


def test_with_several_objectives_a_pruned_trial_has_no_intermediate_values():
    strategy = OptunaSearch(CPU, "nsga2", 0, population_size=8, n_objectives=2, final_rung=1)
    strategy.tell(0, strategy.ask(), (2.5, 1e6), rung=0)
    strategy.tell(1, strategy.ask(), (2.1, 2e6), rung=1)
    pruned, complete = strategy.study.trials
    assert pruned.state == TrialState.PRUNED and pruned.intermediate_values == {}
    assert complete.state == TrialState.COMPLETE and complete.values == [2.1, 2e6]
