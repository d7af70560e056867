"""Several objectives at once: their values, Pareto tournaments, Optuna's multi-objective study,
and a search that trades bits per byte against size."""

import math

import optuna
import pytest

from results.db import RunDatabase
from search.baselines import OptunaSearch
from search.evolution import AgingEvolution, EvolutionConfig, Member, rank
from search.genome import CPU, Genome
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop
from search.objectives import Objectives


def test_objective_values_are_all_minimised_and_infinite_for_failures():
    objectives = Objectives.parse("bpb, params, throughput")
    ok = {"status": "ok", "val_bpb": 1.5, "params": 1000, "tokens_per_second": 800.0}
    assert objectives.of(ok) == (1.5, 1000.0, -800.0)
    assert objectives.of({"status": "diverged"}) == (math.inf,) * 3
    assert Objectives().of(ok) == (1.5,)
    with pytest.raises(ValueError, match="unknown objective"):
        Objectives.parse("bpb,latency")
    with pytest.raises(ValueError, match="first objective must be bpb"):
        Objectives.parse("params,bpb")


def _member(i, bpb, params):
    genome = Genome(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2.0,
                    recurrence_ratio=1, window_size=32, dropout=0.0)
    return Member(i, genome, (bpb, params), 0)


def test_pareto_tournament_ranks_by_front_then_by_isolation():
    members = [_member(1, 1.0, 900), _member(2, 1.2, 300), _member(3, 1.1, 950),  # 3 dominated
               _member(4, 2.0, 100), _member(5, 1.05, 850), _member(6, math.inf, math.inf)]
    ranked = [m.candidate_id for m in rank(members)]
    assert set(ranked[:4]) == {1, 2, 4, 5}  # the first front, in some crowding order
    assert ranked[0] in (1, 4) and ranked[1] in (1, 4)  # its extremes come first (infinite)
    assert ranked[4:] == [3, 6]
    single = [Member(i, members[0].genome, v, 0) for i, v in enumerate([1.2, 0.9, 1.0])]
    assert [m.candidate_id for m in rank(single)] == [1, 2, 0]  # one objective: by value


def test_optuna_runs_a_multi_objective_study():
    strategy = OptunaSearch(CPU, "nsga2", 0, population_size=8, n_objectives=2)
    for i in range(20):
        proposal = strategy.ask()
        value = (2.0 - proposal.genome.d_model / 256, float(CPU.params(proposal.genome)))
        strategy.tell(i, proposal, value if i % 5 else (math.inf, math.inf))
    assert len(strategy.study.directions) == 2
    assert len(strategy.study.best_trials) >= 1  # a Pareto front of trials
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in strategy.study.trials) == 4


def test_a_two_objective_search_keeps_small_models_in_play(tmp_path):
    def train(genome, *_):  # wider is better in bpb but costs parameters
        return {"status": "ok", "val_bpb": 2.0 - genome.d_model / 256,
                "params": CPU.params(genome), "wall_seconds": 1.0}

    db = RunDatabase(tmp_path / "r.db")
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=6, tournament_size=3), 0)
    SearchLoop(strategy, InProcessEvaluator(train), db, SearchLimits(max_candidates=30),
               objectives=Objectives(("bpb", "params"))).run()
    assert all(isinstance(m.fitness, tuple) and len(m.fitness) == 2 for m in strategy.population)
    children = [r for r in db.candidates() if r["operator"] in ("mutation", "crossover")]
    assert children  # selection ran on Pareto ranks without error
