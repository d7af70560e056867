"""Baseline strategies: random search and Optuna TPE / NSGA-II on the same space and interface."""

import math
import statistics

import optuna
import pytest

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
