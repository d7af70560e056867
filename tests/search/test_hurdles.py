"""Progressive hurdles: the rule on hand-made values, and the search loop continuing exactly the
candidates that clear each rung, recording every rung, releasing what does not continue."""

import json

import pytest

from results.db import RunDatabase
from search.evolution import AgingEvolution, EvolutionConfig
from search.genome import CPU
from search.hurdles import Hurdles
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop


def test_rung_budgets_grow_by_the_factor():
    assert Hurdles(rungs=3, factor=3).steps(10) == (10, 30, 90)
    assert Hurdles(rungs=2, factor=2.5).steps(4) == (4, 10)
    # What each rung adds, in first rungs: 10 steps, then 20 more, then 60 more.
    assert [Hurdles(rungs=3, factor=3).relative_cost(r) for r in range(3)] == [1, 2, 6]
    with pytest.raises(ValueError, match="factor"):
        Hurdles(factor=1.0)


def test_a_rung_keeps_its_top_fraction_once_it_has_enough_results():
    hurdles = Hurdles(keep_fraction=1 / 3, min_results=3)
    assert not hurdles.has_bar([5.0]) and not hurdles.has_bar([1.0, 5.0])  # setting the bar
    values = [3.0, 1.0, 2.0]  # 3 results: the best third is 1 result
    assert hurdles.clears(values, 1.0) and not hurdles.clears(values, 2.0)
    values = [3.0, 1.0, 2.0, 0.5, 4.0, 2.5]  # 6 results: the best 2 continue
    assert hurdles.clears(values, 1.0) and hurdles.clears(values, 0.5)
    assert not hurdles.clears(values, 2.0)
    assert Hurdles(keep_fraction=1.0).clears([1.0, 2.0, 3.0], 3.0)  # keep all


def test_a_window_moves_the_bar_with_an_improving_population():
    # Results improve over time (early random candidates, later children of the best): 3.0 is
    # in the top third of everything so far, but not of the last three.
    arrived = [9.0, 8.0, 7.0, 6.0, 2.0, 1.0, 3.0]
    assert Hurdles(keep_fraction=1 / 3).clears(arrived, 3.0)
    assert not Hurdles(keep_fraction=1 / 3, window=3).clears(arrived, 3.0)
    assert Hurdles(keep_fraction=1 / 3, window=3).clears(arrived[:-1] + [0.5], 0.5)
    with pytest.raises(ValueError, match="window"):
        Hurdles(min_results=3, window=2)


def _score(genome, rung):  # made up: wide and shallow is better; every rung improves by 0.1
    return 2.0 - genome.d_model / 256 + genome.n_layers / 20 - 0.1 * rung


def test_loop_continues_exactly_the_candidates_that_clear_each_rung(tmp_path):
    hurdles = Hurdles(rungs=3, factor=3, keep_fraction=1 / 3, min_results=3)
    calls, released = [], []

    def train(genome, candidate_id, rung):
        calls.append((candidate_id, rung, _score(genome, rung)))
        return {"status": "ok", "val_bpb": _score(genome, rung), "rung": rung,
                "steps": hurdles.steps(10)[rung], "wall_seconds": 1.0}

    db = RunDatabase(tmp_path / "r.db")
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    report = SearchLoop(strategy, InProcessEvaluator(train, release=released.append), db,
                        SearchLimits(max_candidates=15), hurdles=hurdles).run()

    # Replay the rule over the rung results in the order they arrived (one slot: call order):
    # the first min_results of a rung wait for its bar, then are judged by it, after the
    # result that set it.
    seen, waiting = {0: [], 1: []}, {0: [], 1: []}
    expected_continuations = []
    for candidate_id, rung, score in calls:
        if rung == 2:
            continue
        seen[rung].append(score)
        if not hurdles.has_bar(seen[rung]):
            waiting[rung].append((candidate_id, score))
            continue
        for judged, value in [(candidate_id, score)] + waiting[rung]:
            if hurdles.clears(seen[rung], value):
                expected_continuations.append((judged, rung + 1))
        waiting[rung] = []
    assert [(c, r) for c, r, _ in calls if r > 0] == expected_continuations
    # Of the first three, only the best went on: none cleared a rung without a bar.
    first = calls[:3]
    assert [c for c, r, _ in calls if r == 1][0] == min(first, key=lambda call: call[2])[0]
    assert report.continued == len(expected_continuations) > 0
    reached = {c: max(r for c2, r, _ in calls if c2 == c) for c, _, _ in calls}
    assert 2 in reached.values() and 0 in reached.values()  # some went all the way, some not

    trained = [r for r in db.candidates() if r["reused_from"] is None]
    for row in trained:  # the candidate's own result is its last rung
        rungs = db.rungs(row["id"])
        assert [r["rung"] for r in rungs] == list(range(len(rungs)))
        assert row["val_bpb"] == rungs[-1]["val_bpb"]
    assert sorted(released) == sorted(r["id"] for r in trained)  # nothing kept afterwards


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _timed_loop(tmp_path, wall, on_tick=None):
    clock = _Clock()

    hurdles = Hurdles(rungs=3, factor=3, min_results=1)  # one result sets the bar

    def train(genome, candidate_id, rung):
        seconds = 10.0 * hurdles.relative_cost(rung)  # 10, 20 and 60 seconds
        clock.now += seconds
        return {"status": "ok", "val_bpb": _score(genome, rung), "rung": rung,
                "wall_seconds": seconds}

    db = RunDatabase(tmp_path / "r.db")
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    loop = SearchLoop(strategy, InProcessEvaluator(train), db, SearchLimits(wall_seconds=wall),
                      clock=clock, hurdles=hurdles, on_tick=on_tick and
                      (lambda: on_tick(clock)))
    return loop, db


def test_no_continuation_starts_that_could_not_reach_the_full_budget(tmp_path):
    # Rung 0 ends at 10 s. Rung 1 would fit in the 25 s left, but rungs 1 and 2 would take 80
    # (the loop expects rung 0's time scaled by the steps each adds), so the candidate stops
    # at rung 0, and no new candidate starts either.
    loop, db = _timed_loop(tmp_path, wall=35)
    loop.run()
    (row,) = db.candidates()
    assert row["status"] == "ok" and json.loads(row["result"])["rung"] == 0
    assert [r["rung"] for r in db.rungs(row["id"])] == [0]


def test_no_candidate_starts_that_could_not_reach_the_full_budget(tmp_path):
    # The first candidate goes through all rungs in 90 s (10 + 20 + 60). Ten seconds are left:
    # enough for a rung 0, but its result could never be the best, so nothing more starts.
    loop, db = _timed_loop(tmp_path, wall=100)
    report = loop.run()
    (row,) = db.candidates()
    assert json.loads(row["result"])["rung"] == 2 and row["status"] == "ok"
    assert "full budget" in report.stop_reason
    # With time for a second full pass, a second candidate starts.
    loop, db = _timed_loop(tmp_path / "longer", wall=180)
    loop.run()
    assert len(db.candidates()) == 2


def test_a_continuation_cut_by_the_deadline_keeps_its_last_rung_result(tmp_path):
    jumped = []

    def jump_past_the_deadline(clock):  # after the first continuation, time runs out
        if not jumped:
            jumped.append(True)
            clock.now += 100.0

    loop, db = _timed_loop(tmp_path, wall=100, on_tick=jump_past_the_deadline)
    report = loop.run()
    (row,) = db.candidates()
    assert report.continued == 1 and report.cancelled == 0
    assert row["status"] == "ok" and json.loads(row["result"])["rung"] == 0  # not cancelled


def test_a_resumed_search_keeps_the_bars_of_the_earlier_session(tmp_path):
    calls = []

    def train(genome, candidate_id, rung):
        calls.append(rung)
        return {"status": "ok", "val_bpb": 5.0 - rung, "rung": rung, "wall_seconds": 1.0}

    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    earlier = [(0, 3.0), (0, 3.5), (0, 4.0), (1, 2.0)]  # rung 0's bar is 3.0
    loop = SearchLoop(strategy, InProcessEvaluator(train), RunDatabase(tmp_path / "r.db"),
                      SearchLimits(max_candidates=1), hurdles=Hurdles(rungs=3),
                      rung_history=earlier)
    loop.run()
    assert calls == [0]  # 5.0 would set the bar in a fresh search; here it does not clear
