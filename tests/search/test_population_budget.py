"""The population follows the budget: a search that trains a few candidates breeds most of them
instead of staying a random search because its population never filled (issue 25).

Driven by a fake trainer on a fake clock, through the real search loop, so the loop's estimate
of how many candidates its budget trains is what sizes the population."""

import pytest

from search.budget import ComputeBudget
from search.evolution import MIN_POPULATION, AgingEvolution, EvolutionConfig
from search.genome import get_space, preset_seeds
from search.hurdles import Hurdles
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop

CPU = get_space("cpu")
INITIAL = ("seed", "random")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Recorder:
    def __init__(self):
        self.proposals, self.results = {}, {}

    def lookup(self, genome_key):
        return None

    def record_proposal(self, proposal):
        self.proposals[len(self.proposals) + 1] = proposal
        return len(self.proposals)

    def record_start(self, candidate_id, worker):
        pass

    def record_result(self, candidate_id, result):
        self.results[candidate_id] = result

    def record_reused(self, proposal, source_id, result):
        raise AssertionError("the fake recorder knows no results")

    def record_cancelled(self, candidate_id, reason):
        pass

    def record_rung(self, candidate_id, rung, result):
        pass


def _search(wall_seconds, seconds_per_candidate, slots=2, config=EvolutionConfig(),
            hurdles=None):
    """Run a search whose every candidate trains in ``seconds_per_candidate`` on each of
    ``slots`` workers; returns the recorder and the strategy."""
    clock, recorder = _Clock(), _Recorder()
    strategy = AgingEvolution(CPU, config, seed=0, seeds=preset_seeds(CPU))

    def train(genome, candidate_id, rung):
        # ``slots`` workers side by side: the in-process evaluator trains one at a time, so
        # each takes 1/slots of a candidate's time on the shared clock.
        seconds = seconds_per_candidate * (hurdles.relative_cost(rung) if hurdles else 1)
        clock.now += seconds / slots
        bpb = 1.0 + (genome.d_model % 97) / 100 + (genome.n_layers % 5) / 50 - rung * 0.1
        return {"status": "ok", "val_bpb": bpb, "wall_seconds": seconds, "rung": rung}

    evaluator = InProcessEvaluator(train, slots=slots)
    SearchLoop(strategy, evaluator, recorder, SearchLimits(wall_seconds=wall_seconds),
               clock=clock, hurdles=hurdles).run()
    return recorder, strategy


def _children_share(recorder):
    operators = [p["operator"] for p in recorder.proposals.values()]
    return sum(op not in INITIAL for op in operators) / len(operators), len(operators)


def test_a_default_three_minute_run_breeds_most_of_its_candidates():
    # The default CPU run trains 8-10 candidates (about 40 s each, 2 workers) in 180 s.
    recorder, strategy = _search(180, seconds_per_candidate=40)
    share, trained = _children_share(recorder)
    assert 8 <= trained <= 10
    assert share >= 0.5, [p["operator"] for p in recorder.proposals.values()]
    assert strategy.population_size == MIN_POPULATION


def test_the_same_run_with_a_fixed_population_of_16_is_a_random_search():
    # What the population following the budget fixes: the same run never fills 16.
    recorder, _ = _search(180, 40, config=EvolutionConfig(population_fraction=None))
    share, _ = _children_share(recorder)
    assert share == 0.0


def test_a_thirty_minute_run_grows_the_population_to_its_cap_and_breeds_most():
    recorder, strategy = _search(1800, seconds_per_candidate=40)
    share, trained = _children_share(recorder)
    assert trained >= 80
    assert share >= 0.5
    assert strategy.population_size == EvolutionConfig().population_size
    initial = [p for p in recorder.proposals.values() if p["operator"] in INITIAL]
    assert len(initial) == strategy.population_size  # filled, never more
    assert [p["operator"] for p in initial[:4]] == ["seed"] * 4  # the presets first


def test_with_hurdles_the_estimate_counts_the_continuations():
    hurdles = Hurdles(rungs=3, factor=2, min_results=2)
    recorder, strategy = _search(600, seconds_per_candidate=20, hurdles=hurdles)
    share, trained = _children_share(recorder)
    assert share >= 0.5
    # A candidate costs 20 s plus a third of 20 s plus a ninth of 40 s: about 31 s, not 20.
    expected = round(trained * EvolutionConfig().population_fraction)
    assert abs(strategy.population_size - expected) <= 2


def test_children_record_their_parents_and_generation():
    recorder, _ = _search(180, 40)
    ids = set(recorder.proposals)
    for candidate_id, proposal in recorder.proposals.items():
        if proposal["operator"] in INITIAL:
            assert proposal["parents"] == [] and proposal["generation"] == 0
        else:
            assert proposal["parents"] and set(proposal["parents"]) <= ids - {candidate_id}
            assert proposal["generation"] >= 1


@pytest.mark.parametrize("expected, population, tournament", [
    (None, 16, 4), (1, 3, 2), (9, 3, 2), (20, 6, 2), (40, 12, 3), (55, 16, 4), (500, 16, 4)])
def test_population_and_tournament_follow_the_expected_candidates(expected, population,
                                                                  tournament):
    config = EvolutionConfig()
    assert config.population_for(expected) == population
    assert config.tournament_for(population) == tournament


def test_a_fixed_population_ignores_the_estimate():
    config = EvolutionConfig(population_size=8, tournament_size=3, population_fraction=None)
    assert config.population_for(9) == 8 and config.tournament_for(8) == 3


def test_a_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="population_fraction"):
        EvolutionConfig(population_fraction=0.0)


def test_the_budget_estimates_candidates_from_the_pace_so_far():
    clock = _Clock()
    budget = ComputeBudget(wall_seconds=100, clock=clock)
    budget.start()
    assert budget.expected_candidates(launched=2, slots=2) is None  # nothing finished yet
    clock.now = 10.0
    budget.record_duration(0, 10.0)
    assert budget.expected_candidates(launched=2, slots=2) == 2 + 18  # 90 s left, 2 workers
