"""Aging evolution and the search loop, with an in-process evaluator and a fake clock."""

import json
import math
import random

import pytest

from results.db import RunDatabase
from search.evolution import AgingEvolution, EvolutionConfig, Member, rank
from search.genome import CPU, GENES, SearchSpace
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop


def fake_result(genome, status="ok", seconds=1.0):
    # A made-up fitness that prefers wide, shallow models: enough to watch selection work.
    bpb = 2.0 - genome.d_model / 256 + genome.n_layers / 20
    return {"status": status, "val_bpb": bpb if status == "ok" else None,
            "val_loss": bpb, "wall_seconds": seconds, "params": 1000}


def test_aging_removes_the_oldest_not_the_worst():
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=3, tournament_size=2), 0)
    for candidate_id, fitness in enumerate([0.1, 5.0, 6.0, 7.0]):
        strategy.tell(candidate_id, strategy.ask(), fitness)
    assert [m.candidate_id for m in strategy.population] == [1, 2, 3]  # the best (0) aged out


def test_children_come_from_tournaments_once_the_population_is_full():
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=4), 0,
                              seeds=[])
    ops = []
    for i in range(10):
        proposal = strategy.ask()
        ops.append(proposal.operator)
        strategy.tell(i, proposal, float(i))
    assert ops[:4] == ["random"] * 4 and set(ops[4:]) <= {"mutation", "crossover"}
    # A full tournament always picks the fittest member as (first) parent.
    assert all(p for p in ops[4:])


def test_strategy_avoids_genomes_it_has_seen():
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 1)
    keys = []
    for i in range(40):
        proposal = strategy.ask()
        keys.append(proposal.genome.key)
        strategy.tell(i, proposal, random.Random(i).random())
    assert len(set(keys)) == len(keys)


# Genes that repair never touches in a valid genome, so a change to one is the mutation's own.
FREE_GENES = tuple(g for g in GENES if g not in ("d_model", "n_layers", "n_heads", "n_kv_heads"))


def _genes_mutated(extra_gene_probability, children=300):
    """For each mutant child: how many free genes differ from its parent."""
    config = EvolutionConfig(population_size=4, tournament_size=2, crossover_probability=0.0,
                             extra_gene_probability=extra_gene_probability)
    strategy = AgingEvolution(CPU, config, 0)
    genomes, changed = {}, []
    for i in range(children):
        proposal = strategy.ask()
        genomes[i] = proposal.genome
        if proposal.operator == "mutation":
            parent = genomes[proposal.parents[0]]
            changed.append(sum(getattr(parent, g) != getattr(proposal.genome, g)
                               for g in FREE_GENES))
        strategy.tell(i, proposal, random.Random(i).random())
    return changed


def test_mutants_change_one_gene_or_sometimes_a_few():
    assert max(_genes_mutated(0.0)) == 1  # one gene per child: at most one free gene moved
    several = _genes_mutated(EvolutionConfig().extra_gene_probability)
    share = sum(n >= 2 for n in several) / len(several)
    assert 0.1 < share < 0.6  # each of 12 other genes at 1/13: ~1 in 4 children moves 2+ genes
    with pytest.raises(ValueError, match="extra_gene_probability"):
        EvolutionConfig(extra_gene_probability=1.5)


def _loop(tmp_path, train, limits, space=CPU, seed=0, clock=None, name="r.db"):
    db = RunDatabase(tmp_path / name)
    strategy = AgingEvolution(space, EvolutionConfig(population_size=4, tournament_size=2), seed)
    kwargs = {"clock": clock} if clock else {}
    loop = SearchLoop(strategy, InProcessEvaluator(lambda g, *_: train(g)), db, limits,
                      **kwargs)
    return loop, db


def test_gene_pool_children_recombine_the_best_members_then_mutate():
    config = EvolutionConfig(population_size=6, tournament_size=2, gene_pool_fraction=0.5,
                             extra_gene_probability=0.0)
    strategy = AgingEvolution(CPU, config, 0)
    genomes = {}
    for i in range(30):
        proposal = strategy.ask()
        genomes[i] = proposal.genome
        if i >= 6:  # the population is full: every child comes from its best half
            best_half = [m.candidate_id for m in rank(list(strategy.population))[:3]]
            assert proposal.operator == "gene-pool" and list(proposal.parents) == best_half
            parents = [genomes[p] for p in proposal.parents]
            inherited = sum(any(getattr(proposal.genome, g) == getattr(p, g) for p in parents)
                            for g in FREE_GENES)
            assert inherited >= len(FREE_GENES) - 1  # all but the one mutated gene
        strategy.tell(i, proposal, random.Random(i).random())
    with pytest.raises(ValueError, match="gene_pool_fraction"):
        EvolutionConfig(gene_pool_fraction=-0.1)


def test_a_repeated_genome_reuses_the_recorded_result(tmp_path):
    tiny = SearchSpace(name="tiny", d_model=(64,), n_layers=(2, 3), n_heads=(2,),
                       n_kv_heads=(1,), ffn_multiplier=(2.0,), recurrence_ratio=(1,),
                       window_size=(32,), dropout=(0.0,), vocab_size=64)
    trained = []

    def train(genome):
        trained.append(genome.key)
        return fake_result(genome)

    loop, db = _loop(tmp_path, train, SearchLimits(max_candidates=8), space=tiny)
    report = loop.run()
    assert len(trained) == len(set(trained)) == 2  # the space has two genomes
    assert report.reused == 6 and report.completed == 2
    rows = db.candidates()
    assert len(rows) == 8 and sum(r["reused_from"] is not None for r in rows) == 6
    assert db.counts()["reused"] == 6


def test_diverged_and_failed_candidates_are_recorded_and_the_search_goes_on(tmp_path):
    def train(genome):
        if genome.n_layers % 3 == 0:
            return fake_result(genome, "diverged") | {"error": "loss nan at step 3"}
        if genome.n_layers % 3 == 1:
            return fake_result(genome, "failed") | {"error": "boom"}
        return fake_result(genome)

    loop, db = _loop(tmp_path, train, SearchLimits(max_candidates=20))
    report = loop.run()
    statuses = {row["status"] for row in db.candidates()}
    assert {"diverged", "failed", "ok"} <= statuses
    assert report.completed + report.reused == 20
    diverged = [r for r in db.candidates() if r["status"] == "diverged"][0]
    assert diverged["error"] == "loss nan at step 3" and diverged["val_bpb"] is None
    assert all(math.isfinite(r["val_bpb"]) for r in db.leaderboard())


def test_rejected_candidates_never_train_and_the_search_goes_on(tmp_path):
    trained = []

    def train(genome):
        trained.append(genome.key)
        return fake_result(genome)

    db = RunDatabase(tmp_path / "r.db")
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0)
    too_wide = InProcessEvaluator(lambda g, *_: train(g),
                                  reject=lambda g: "too wide" if g.d_model > 128 else None)
    report = SearchLoop(strategy, too_wide, db, SearchLimits(max_candidates=12)).run()
    rows = db.candidates()
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and all(r["d_model"] > 128 for r in map(_genome_of, rejected))
    assert all(r["error"] == "too wide" and r["attempts"] == 0 for r in rejected)
    assert len(trained) == len(rows) - len(rejected) - report.reused
    assert report.rejected == len(rejected) and report.statuses["rejected"] == len(rejected)


def _genome_of(row):
    return json.loads(row["genome"])


def test_a_search_without_workers_stops_and_says_why(tmp_path):
    loop, _ = _loop(tmp_path, fake_result, SearchLimits(max_candidates=3))
    loop.evaluator.slots = 0
    report = loop.run()
    assert report.launched == 0 and report.stop_reason == "no worker is left to train candidates"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_budget_stops_launching_what_would_overrun(tmp_path):
    clock = FakeClock()

    def train(genome):
        clock.now += 10.0  # every candidate takes 10 seconds
        return fake_result(genome, seconds=10.0)

    loop, db = _loop(tmp_path, train, SearchLimits(wall_seconds=45), clock=clock)
    report = loop.run()
    # Launched at t=0, 10, 20, 30; at t=40 another 10 s would overrun 45.
    assert report.completed == 4 and report.cancelled == 0
    assert "overrun" in report.stop_reason and clock.now == 40.0


def test_max_candidates_and_generations(tmp_path):
    loop, db = _loop(tmp_path, fake_result, SearchLimits(max_candidates=7))
    assert loop.run().completed == 7 and len(db.candidates()) == 7
    loop, db = _loop(tmp_path, fake_result, SearchLimits(max_generations=2), name="g.db")
    report = loop.run()
    assert "generation 2" in report.stop_reason
    assert max(r["generation"] for r in db.candidates()) == 2


def test_same_seed_same_search_with_one_worker(tmp_path):
    def history(seed, name):
        loop, db = _loop(tmp_path, fake_result, SearchLimits(max_candidates=15), seed=seed,
                         name=name)
        loop.run()
        return [(r["genome_key"], r["operator"], r["parents"]) for r in db.candidates()]

    assert history(5, "a.db") == history(5, "b.db")
    assert history(5, "a.db") != history(6, "c.db")


def test_limits_need_at_least_one_bound():
    with pytest.raises(ValueError, match="needs a limit"):
        SearchLimits()


def test_with_hurdles_a_candidate_stopped_early_never_displaces_one_that_went_further():
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=3, tournament_size=3), 0)
    # (fitness, rung): the full-budget result (rung 2) came first and is the oldest.
    for candidate_id, (fitness, rung) in enumerate([(2.6, 2), (3.9, 0), (3.1, 1), (3.8, 0),
                                                   (4.0, 0)]):
        strategy.tell(candidate_id, strategy.ask(), fitness, rung=rung)
    # Over size twice: each time the oldest of the lowest rung present (0) left.
    assert [m.candidate_id for m in strategy.population] == [0, 2, 4]
    # Ranked by how far a candidate got first: a rung-0 number is not comparable with the rest.
    ranked = rank(list(strategy.population))
    assert [m.candidate_id for m in ranked] == [0, 2, 4]
    strategy.tell(5, strategy.ask(), 3.5, rung=1)
    strategy.tell(6, strategy.ask(), 2.7, rung=2)
    # The last rung-0 member left first, then the oldest of rung 1.
    assert [m.candidate_id for m in strategy.population] == [0, 5, 6]


def test_rank_puts_further_rungs_first_even_against_better_numbers():
    members = [Member(0, CPU.sample(random.Random(0)), 1.0, 0, rung=0),
               Member(1, CPU.sample(random.Random(1)), 3.0, 0, rung=1),
               Member(2, CPU.sample(random.Random(2)), 2.0, 0, rung=1)]
    assert [m.candidate_id for m in rank(members)] == [2, 1, 0]
