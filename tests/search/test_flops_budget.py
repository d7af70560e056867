"""A search budget in training FLOPs: predicted before launch, never overrun, hurdled candidates
giving back what they did not train, earlier sessions' FLOPs counted on resume."""

import json

import pytest

from results.db import RunDatabase
from search.evolution import AgingEvolution, EvolutionConfig
from search.genome import CPU, Genome
from search.hurdles import Hurdles
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop

STEPS = (10, 20, 40)  # hurdle rungs end at these steps; without hurdles a candidate trains 10


def _flops(genome, rung):
    """Made up, but like the model's count: proportional to size and to steps trained."""
    return float(genome.d_model * genome.n_layers * STEPS[rung])


def _score(genome, rung):
    return 2.0 - genome.d_model / 256 + genome.n_layers / 20 - 0.1 * rung


def _loop(tmp_path, budget, hurdles=None, flops=_flops, name="r.db", slots=1):
    def train(genome, candidate_id, rung):
        return {"status": "ok", "val_bpb": _score(genome, rung), "rung": rung,
                "train_flops": flops(genome, rung), "wall_seconds": 1.0}

    db = RunDatabase(tmp_path / name)
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    loop = SearchLoop(strategy, InProcessEvaluator(train, slots=slots), db,
                      SearchLimits(train_flops=budget), hurdles=hurdles, train_flops=flops)
    return loop, db


def _genome(row):
    return Genome.from_dict(json.loads(row["genome"]))


def _spent(db):
    return sum(row["train_flops"] for row in db.candidates() if row["reused_from"] is None)


def test_a_flops_budget_buys_exactly_the_candidates_that_fit(tmp_path):
    # Every candidate costs the same: a budget of 7.5 candidates trains 7, then stops.
    loop, db = _loop(tmp_path, budget=7.5 * 100, flops=lambda genome, rung: 100.0)
    report = loop.run()
    trained = [row for row in db.candidates() if row["reused_from"] is None]
    assert len(trained) == 7 and all(row["status"] == "ok" for row in trained)
    assert _spent(db) == db.train_flops_spent() == loop.flops_spent == 700
    assert "compute budget" in report.stop_reason


def test_no_candidate_starts_whose_full_budget_would_overrun(tmp_path):
    budget = 40_000.0
    loop, db = _loop(tmp_path, budget)
    report = loop.run()
    assert 0 < _spent(db) <= budget
    assert "compute budget" in report.stop_reason
    # It stopped at the first proposal that did not fit, not earlier: what is left is less
    # than the largest candidate of the space costs.
    largest = max(CPU.values("d_model")) * max(CPU.values("n_layers")) * STEPS[0]
    assert budget - _spent(db) < largest


@pytest.mark.parametrize("slots", [1, 2])  # 2: a proposal waits for a result to give back
def test_hurdled_candidates_give_back_the_flops_of_rungs_they_never_train(tmp_path, slots):
    hurdles = Hurdles(rungs=3, factor=2, keep_fraction=1 / 3, min_results=3)
    budget = 200_000.0
    loop, db = _loop(tmp_path, budget, hurdles=hurdles, slots=slots)
    report = loop.run()
    trained = [row for row in db.candidates() if row["reused_from"] is None]
    reached = [json.loads(row["result"])["rung"] for row in trained]
    assert 0 < _spent(db) <= budget and "compute budget" in report.stop_reason
    assert reached.count(2) >= 1 and reached.count(0) > reached.count(2)
    # Holding every candidate's full budget to the end would have trained only as many as
    # the budget buys at full cost; given back, the early stops paid for more candidates.
    assert sum(_flops(_genome(row), 2) for row in trained) > budget
    # A rung result counts the candidate's training so far; the run's spend is the sum of
    # its candidates' last rungs.
    for row in trained:
        rungs = db.rungs(row["id"])
        assert json.loads(rungs[-1]["result"])["train_flops"] == row["train_flops"]


def test_a_resumed_search_counts_the_flops_earlier_sessions_spent(tmp_path):
    loop, db = _loop(tmp_path, budget=1000.0, flops=lambda genome, rung: 100.0)
    report = loop.run(already_flops=650.0)
    assert len(db.candidates()) == 3 and loop.flops_spent == 950.0
    assert "compute budget" in report.stop_reason
    loop, _ = _loop(tmp_path, budget=1000.0, flops=lambda genome, rung: 100.0, name="b.db")
    assert loop.run(already_flops=1000.0).launched == 0  # spent already: nothing starts


def test_the_database_sums_what_every_candidate_trained(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    proposal = {"genome": {}, "genome_key": "a", "summary": "a", "parents": [],
                "operator": "random", "generation": 0}
    done = db.record_proposal(proposal)
    db.record_result(done, {"status": "ok", "val_bpb": 2.0, "train_flops": 300.0})
    db.record_reused({**proposal, "genome_key": "a"}, done, {"status": "ok", "train_flops": 300.0})
    # Cut off after two rungs: it is trained again on resume, but those rungs were spent.
    owed = db.record_proposal({**proposal, "genome_key": "b"})
    db.record_rung(owed, 0, {"status": "ok", "train_flops": 100.0})
    db.record_rung(owed, 1, {"status": "ok", "train_flops": 250.0})
    db.record_cancelled(owed, "interrupted")
    assert db.train_flops_spent() == 300.0 + 250.0


def test_limits_take_a_flops_budget_alone_and_reject_a_bad_one(tmp_path):
    assert SearchLimits(train_flops=1e12).wall_seconds is None
    with pytest.raises(ValueError, match="train_flops must be positive"):
        SearchLimits(train_flops=0)
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    with pytest.raises(ValueError, match="FLOPs budget needs"):
        SearchLoop(strategy, InProcessEvaluator(lambda *a: {}), RunDatabase(tmp_path / "r.db"),
                   SearchLimits(train_flops=1e12))


def test_candidates_waiting_for_a_bar_hold_only_what_they_trained(tmp_path):
    # Full budget 4000, rung 0 1000. Had the first two held 4000 each while they waited for
    # the bar of three results, the third could not start within 9000 and no bar would ever
    # be set; they hold 1000 each, so the bar is set and its best continues.
    hurdles = Hurdles(rungs=3, factor=2, keep_fraction=1 / 3, min_results=3)
    loop, db = _loop(tmp_path, 9000.0, hurdles=hurdles,
                     flops=lambda genome, rung: 100.0 * STEPS[rung])
    loop.run()
    trained = [row for row in db.candidates() if row["reused_from"] is None]
    assert len(trained) >= 3 and _spent(db) <= 9000.0
    assert max(json.loads(row["result"])["rung"] for row in trained) >= 1
