"""The hurdle scheduler on its own, without a search loop: what a finished rung's result
decides (continue, wait for the rung's bar, stop), and the bars an earlier session set."""

import math

from search.hurdles import Hurdles
from search.scheduler import Decision, HurdleScheduler


def _result(value, rung=0, status="ok"):
    return {"status": status, "val_bpb": value, "rung": rung}


def _decisions(judgements):
    return [(j.candidate_id, j.decision) for j in judgements]


def test_the_first_results_of_a_rung_wait_for_its_bar_then_are_judged_by_it():
    scheduler = HurdleScheduler(Hurdles(rungs=3, keep_fraction=1 / 3, min_results=3))
    assert _decisions(scheduler.judge(1, _result(2.0))) == [(1, Decision.WAIT)]
    assert _decisions(scheduler.judge(2, _result(1.0))) == [(2, Decision.WAIT)]
    assert [c for c, _ in scheduler.waiting[0]] == [1, 2]
    # The third sets the bar (the best third: 1.0): it is judged first, then those that waited.
    judged = scheduler.judge(3, _result(3.0))
    assert _decisions(judged) == [(3, Decision.STOP), (1, Decision.STOP), (2, Decision.CONTINUE)]
    assert judged[2].result == _result(1.0) and judged[2].rung == 0
    assert scheduler.waiting[0] == [] and scheduler.rung_values[0] == [2.0, 1.0, 3.0]
    # Later results are judged at once.
    assert _decisions(scheduler.judge(4, _result(0.5))) == [(4, Decision.CONTINUE)]


def test_a_failure_or_the_last_rung_stops_without_setting_a_bar():
    scheduler = HurdleScheduler(Hurdles(rungs=2, min_results=1))
    assert _decisions(scheduler.judge(1, _result(None, status="failed"))) == [(1, Decision.STOP)]
    assert _decisions(scheduler.judge(2, _result(math.inf))) == [(2, Decision.STOP)]
    assert _decisions(scheduler.judge(3, _result(0.1, rung=1))) == [(3, Decision.STOP)]
    assert scheduler.rung_values == [[], []]


def test_continuing_candidates_are_kept_with_their_last_cleared_result():
    scheduler = HurdleScheduler(Hurdles(rungs=3, min_results=1))
    (judgement,) = scheduler.judge(7, _result(1.0))
    assert judgement.decision is Decision.CONTINUE
    scheduler.mark_continued(7, judgement.result)
    assert scheduler.drop(7) == _result(1.0)  # cut short later: this is its result
    assert scheduler.drop(7) is None and scheduler.drop(8) is None


def test_a_resumed_search_keeps_the_bars_an_earlier_session_set():
    earlier = [(0, 3.0), (0, 3.5), (0, 4.0), (1, 2.0), (0, math.inf), (5, 1.0)]
    scheduler = HurdleScheduler(Hurdles(rungs=3, keep_fraction=1 / 3, min_results=3), earlier)
    # Failures and rungs this search does not have are left out.
    assert scheduler.rung_values == [[3.0, 3.5, 4.0], [2.0], []]
    # In a fresh search 5.0 would wait for the bar; here the bar exists and it does not clear.
    assert _decisions(scheduler.judge(1, _result(5.0))) == [(1, Decision.STOP)]
    assert _decisions(scheduler.judge(2, _result(2.5))) == [(2, Decision.CONTINUE)]


def test_at_the_end_the_waiting_are_handed_back_rung_by_rung():
    scheduler = HurdleScheduler(Hurdles(rungs=3, min_results=3))
    scheduler.judge(1, _result(2.0))
    scheduler.judge(2, _result(1.5, rung=1))
    scheduler.judge(3, _result(1.0))
    assert scheduler.drain_waiting() == [(1, _result(2.0)), (3, _result(1.0)),
                                         (2, _result(1.5, rung=1))]
    assert scheduler.drain_waiting() == [] and scheduler.waiting == [[], [], []]
