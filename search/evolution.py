"""Asynchronous regularized (aging) evolution (Real et al., 2019).

A population of the ``population_size`` most recently evaluated genomes. Each new child comes
from a tournament: sample ``tournament_size`` members, take the fittest as the parent, mutate it
(one gene, sometimes a few) or cross it with the runner-up. When a result arrives the child
joins the population and the oldest member leaves, however fit it is: that ageing regularises
the search. There is no generation barrier: ``ask`` can be called whenever a worker is free,
before earlier children have been told. With ``gene_pool_fraction`` set, a child instead
recombines the genes of the population's best members, then mutates (an option, measured in
BENCHMARKS.md).

With progressive hurdles a result also says how far its candidate got (the budget ``rung`` it
ended at), and bits per byte after 10 steps are not comparable with bits per byte after 90.
So a candidate that went further ranks above one stopped at an earlier hurdle, whatever the
numbers, and when the population is over its size the oldest member *of the lowest rung
present* leaves: a candidate stopped at a hurdle never displaces one that cleared it. Without
hurdles every result is rung 0 and this is plain aging. (With the cheap first rung, two thirds
of the results are early stops; under plain aging they would flush the few fully trained
candidates out of the population within a handful of results.)

Before the population is full, the first children are the warm-start seeds, then random samples.

The population follows the budget: a search that trains nine candidates with a population of 16
never fills it, and is a random search of nine genomes. With ``population_fraction`` set, the
search loop tells the strategy how many candidates its budget is expected to train
(``plan``), and the population (so the number of seeds and random samples) is that fraction of
them, between ``MIN_POPULATION`` and ``population_size``; the tournament shrinks with it. The
initial members are counted when proposed, not when told, so workers that finish in any order
never draw more of them than the population holds.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from search.genome import GENES, Genome, SearchSpace
from search.operators import crossover, mutate, recombine
from search.pareto import crowding_distance, non_dominated_sort

MIN_POPULATION = 3  # a tournament needs a choice, and crossover a runner-up
INITIAL_OPERATORS = ("seed", "random")


@dataclass(frozen=True)
class Proposal:
    genome: Genome
    parents: tuple[int, ...] = ()  # candidate ids
    operator: str = "random"  # seed | random | mutation | crossover | gene-pool
    generation: int = 0  # 0 for seeds and random samples; parent's generation + 1


@dataclass(frozen=True)
class Member:
    candidate_id: int
    genome: Genome
    # Lower is better: validation bits per byte, or a tuple of objectives (all minimised);
    # infinite for failed candidates.
    fitness: float | tuple[float, ...]
    generation: int
    rung: int = 0  # with hurdles: the budget rung the candidate ended at


@dataclass(frozen=True)
class EvolutionConfig:
    population_size: int = 16
    tournament_size: int = 4
    crossover_probability: float = 0.25
    # A mutant changes one gene, and each other gene with this probability (the classic 1/n
    # rate; 0 for exactly one, as Real et al. with thousands of children). Short searches breed
    # a few dozen children over 13 genes: one gene at a time, a population that started narrow
    # never gets wide (measured in BENCHMARKS.md).
    extra_gene_probability: float = 1 / len(GENES)
    # Above 0: every child instead draws each gene from one of the best this fraction of the
    # population (at least two), then mutates: gene-pool recombination, which spreads what the
    # best members share to every child (as NSGA-II's crossover of elites and TPE's density of
    # good trials do) rather than searching around one tournament winner at a time.
    gene_pool_fraction: float = 0.0
    # The population is this fraction of the candidates the budget is expected to train (at
    # least MIN_POPULATION, at most population_size); None: always population_size. 0.3 makes
    # most candidates of a 3-minute CPU run (8-10 candidates) children (a default run bred 6 of
    # its 10: BENCHMARKS.md), and keeps 16 from about 55 candidates on.
    population_fraction: float | None = 0.3
    max_dedupe_tries: int = 20

    def __post_init__(self) -> None:
        if self.population_size < 2:
            raise ValueError(f"population_size={self.population_size}: must be at least 2")
        if not 1 <= self.tournament_size <= self.population_size:
            raise ValueError(f"tournament_size={self.tournament_size}: must be in "
                             f"[1, population_size={self.population_size}]")
        if not 0 <= self.extra_gene_probability <= 1:
            raise ValueError(f"extra_gene_probability={self.extra_gene_probability}: must be "
                             f"in [0, 1]")
        if not 0 <= self.gene_pool_fraction <= 1:
            raise ValueError(f"gene_pool_fraction={self.gene_pool_fraction}: must be in [0, 1]")
        if self.population_fraction is not None and not 0 < self.population_fraction <= 1:
            raise ValueError(f"population_fraction={self.population_fraction}: must be in "
                             f"(0, 1]")

    def population_for(self, expected_candidates: int | None) -> int:
        """The population for a search expected to train ``expected_candidates`` (None: not
        known yet, or no fraction set: ``population_size``)."""
        if expected_candidates is None or self.population_fraction is None:
            return self.population_size
        wanted = round(expected_candidates * self.population_fraction)
        return max(min(MIN_POPULATION, self.population_size), min(self.population_size, wanted))

    def tournament_for(self, population: int) -> int:
        """The tournament for a population of ``population``: ``tournament_size`` scaled with
        it (the same selection pressure), at least 2 when the population has two."""
        scaled = round(self.tournament_size * population / self.population_size)
        return max(min(2, population), min(self.tournament_size, scaled, population))


def rank(members: list[Member]) -> list[Member]:
    """Best first: the furthest hurdle rung first; within a rung by fitness, or with several
    objectives by Pareto front, then by crowding distance (the more isolated first) within a
    front, as NSGA-II's tournaments do."""
    ranked: list[Member] = []
    for rung in sorted({m.rung for m in members}, reverse=True):
        ranked += _rank_comparable([m for m in members if m.rung == rung])
    return ranked


def _rank_comparable(members: list[Member]) -> list[Member]:
    if not members or not isinstance(members[0].fitness, tuple) or len(members[0].fitness) == 1:
        return sorted(members, key=lambda m: (_first(m.fitness), m.candidate_id))
    points = [m.fitness for m in members]
    order: list[int] = []
    for front in non_dominated_sort(points):
        crowding = crowding_distance(points, front)
        order += sorted(front, key=lambda i: (-crowding[i], members[i].candidate_id))
    return [members[i] for i in order]


def _first(fitness: float | tuple[float, ...]) -> float:
    return fitness[0] if isinstance(fitness, tuple) else fitness


class AgingEvolution:
    def __init__(self, space: SearchSpace, config: EvolutionConfig, seed: int,
                 seeds: list[Genome] = ()) -> None:
        self.space, self.config = space, config
        self.rng = random.Random(seed)
        self.population: deque[Member] = deque()
        self.pending_seeds = list(seeds)
        self.seen: set[str] = set()  # genome keys already proposed or evaluated
        self.population_size = config.population_size  # until ``plan`` says otherwise
        self.initial: set[str] = set()  # keys of the seeds and random samples, proposed or told

    def ask(self) -> Proposal:
        """The next genome to evaluate; avoids genomes already seen when it can."""
        proposal = self._propose()
        for _ in range(self.config.max_dedupe_tries):
            if proposal.genome.key not in self.seen:
                break
            proposal = self._propose()
        self.seen.add(proposal.genome.key)
        if proposal.operator in INITIAL_OPERATORS:
            self.initial.add(proposal.genome.key)
        return proposal

    def reseed(self, seed_text: str) -> None:
        """Draw fresh randomness from ``seed_text`` (a resumed search; see
        ``search.loop.Strategy``)."""
        self.rng = random.Random(seed_text)

    def mark_seen(self, genome_key: str) -> None:
        """Do not propose this genome (in flight elsewhere, e.g. relaunched on resume)."""
        self.seen.add(genome_key)

    def plan(self, expected_candidates: int) -> None:
        """The search is expected to train ``expected_candidates`` in all (the loop's estimate,
        refined as results arrive): size the population to it."""
        self.population_size = self.config.population_for(expected_candidates)

    def _propose(self) -> Proposal:
        if len(self.initial) < self.population_size or not self.population:
            return self._initial()
        if self.config.gene_pool_fraction:
            return self._from_gene_pool()
        tournament = min(self.config.tournament_for(self.population_size),
                         len(self.population))
        contestants = rank(self.rng.sample(list(self.population), tournament))
        parent = contestants[0]
        if len(contestants) > 1 and self.rng.random() < self.config.crossover_probability:
            other = contestants[1]
            child = crossover(parent.genome, other.genome, self.space, self.rng)
            return Proposal(child, (parent.candidate_id, other.candidate_id), "crossover",
                            max(parent.generation, other.generation) + 1)
        child = mutate(parent.genome, self.space, self.rng, n_genes=self._mutation_size())
        return Proposal(child, (parent.candidate_id,), "mutation", parent.generation + 1)

    def _initial(self) -> Proposal:
        """A warm-start seed not yet seen, else a random sample."""
        while self.pending_seeds:
            genome = self.space.repair(self.pending_seeds.pop(0))
            if genome.key not in self.seen:
                return Proposal(genome, operator="seed")
        return Proposal(self.space.sample(self.rng), operator="random")

    def _from_gene_pool(self) -> Proposal:
        ranked = rank(list(self.population))
        pool = ranked[:max(2, math.ceil(self.config.gene_pool_fraction * len(ranked)))]
        mixed = recombine([m.genome for m in pool], self.space, self.rng)
        child = mutate(mixed, self.space, self.rng, n_genes=self._mutation_size())
        return Proposal(child, tuple(m.candidate_id for m in pool), "gene-pool",
                        max(m.generation for m in pool) + 1)

    def _mutation_size(self) -> int:
        extra = self.config.extra_gene_probability
        return 1 + (sum(self.rng.random() < extra for _ in GENES[1:]) if extra else 0)

    def tell(self, candidate_id: int, proposal: Proposal, fitness: float | tuple[float, ...],
             rung: int = 0) -> None:
        """A result arrived: the child joins, the oldest member of the lowest rung leaves."""
        self.seen.add(proposal.genome.key)
        if proposal.operator in INITIAL_OPERATORS:  # replayed on resume, or proposed here
            self.initial.add(proposal.genome.key)
        self.population.append(Member(candidate_id, proposal.genome, fitness,
                                      proposal.generation, rung))
        while len(self.population) > self.population_size:
            lowest = min(m.rung for m in self.population)
            self.population.remove(next(m for m in self.population if m.rung == lowest))
