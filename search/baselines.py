"""Baseline strategies on the same search space, behind the same ``ask``/``tell`` interface as
aging evolution, so a comparison changes nothing but the strategy:

- ``RandomSearch``: independent samples from the space (the presets first, as evolution does);
- ``OptunaSearch``: an Optuna sampler (TPE, or NSGA-II) driving the genes through Optuna's
  ask-and-tell interface. Each gene is an integer index into the space's ordered values, so
  "near" means the same as it does for mutation; the sampled genome is repaired exactly like
  any other (divisibility, parameter budget), and Optuna learns f(repair(x)).

Failed candidates (infinite fitness) are told to Optuna as failed trials, which its samplers
leave out of their models. With progressive hurdles, a candidate stopped at an earlier rung is
told as a pruned trial whose last intermediate value is its bits per byte at that rung, as an
Optuna pruner would leave it: TPE then ranks complete trials first and pruned ones by how far
they got, then by value (the order hurdled evolution ranks by), and NSGA-II breeds from
complete trials only. Told as complete, a rung-0 value after a quarter of the budget would be
compared with full-budget ones as if it were one of them.
"""

from __future__ import annotations

import math
import random

import optuna
from optuna.trial import TrialState

from search.evolution import Proposal
from search.genome import GENES, Genome, SearchSpace

MAX_DEDUPE_TRIES = 20


class RandomSearch:
    def __init__(self, space: SearchSpace, seed: int, seeds: list[Genome] = ()) -> None:
        self.space = space
        self.rng = random.Random(seed)
        self.pending_seeds = list(seeds)
        self.seen: set[str] = set()

    def ask(self) -> Proposal:
        while self.pending_seeds:
            genome = self.space.repair(self.pending_seeds.pop(0))
            if genome.key not in self.seen:
                self.seen.add(genome.key)
                return Proposal(genome, operator="seed")
        genome = self.space.sample(self.rng)
        for _ in range(MAX_DEDUPE_TRIES):
            if genome.key not in self.seen:
                break
            genome = self.space.sample(self.rng)
        self.seen.add(genome.key)
        return Proposal(genome, operator="random")

    def tell(self, candidate_id: int, proposal: Proposal, fitness: float, rung: int = 0) -> None:
        self.seen.add(proposal.genome.key)

    def reseed(self, seed_text: str) -> None:
        """Draw fresh randomness from ``seed_text`` (a resumed search; see
        ``search.loop.Strategy``)."""
        self.rng = random.Random(seed_text)

    def mark_seen(self, genome_key: str) -> None:
        """Do not sample this genome again (in flight elsewhere, e.g. relaunched on resume)."""
        self.seen.add(genome_key)

    def plan(self, expected_candidates: int) -> None:
        """Random samples need no population."""


SAMPLERS = {"tpe": "TPE", "nsga2": "NSGA-II"}


def make_sampler(name: str, seed: int, population_size: int = 16) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate: the genes interact (heads divide the width, the parameter budget)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                          n_startup_trials=population_size)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    raise ValueError(f"unknown Optuna sampler {name!r}: choose from {', '.join(SAMPLERS)}")


class OptunaSearch:
    def __init__(self, space: SearchSpace, sampler: str, seed: int, seeds: list[Genome] = (),
                 population_size: int = 16, n_objectives: int = 1, final_rung: int = 0) -> None:
        """``final_rung``: with hurdles, the index of the last (full-budget) rung."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.sampler_name, self.final_rung = space, sampler, final_rung
        self.study = optuna.create_study(directions=["minimize"] * n_objectives,
                                         sampler=make_sampler(sampler, seed, population_size))
        self.distributions = {gene: optuna.distributions.IntDistribution(
            0, len(space.values(gene)) - 1) for gene in GENES}
        for genome in seeds:  # warm start: Optuna evaluates these first, in order
            self.study.enqueue_trial(self._params(space.repair(genome)))
        self.pending_seeds = len(seeds)
        self.trials: dict[int, optuna.trial.Trial] = {}  # id(proposal) -> its open trial
        self.seen: set[str] = set()  # genome keys proposed or told (Optuna does not dedupe)

    def _params(self, genome: Genome) -> dict[str, int]:
        return {gene: self.space.values(gene).index(getattr(genome, gene)) for gene in GENES}

    def ask(self) -> Proposal:
        trial = self.study.ask(self.distributions)
        genome = self.space.repair(Genome(**{
            gene: self.space.values(gene)[trial.params[gene]] for gene in GENES}))
        operator = "seed" if self.pending_seeds else self.sampler_name
        self.pending_seeds = max(0, self.pending_seeds - 1)
        proposal = Proposal(genome, operator=operator)
        self.trials[id(proposal)] = trial
        self.seen.add(genome.key)
        return proposal

    def reseed(self, seed_text: str) -> None:
        """Nothing to reseed: Optuna's sampler keeps its own RNG, seeded at construction."""

    def mark_seen(self, genome_key: str) -> None:
        """Recorded among the genomes seen (Optuna's sampler does not avoid repeats)."""
        self.seen.add(genome_key)

    def plan(self, expected_candidates: int) -> None:
        """Optuna's samplers fix their startup trials and population when built."""

    def tell(self, candidate_id: int, proposal: Proposal,
             fitness: float | tuple[float, ...], rung: int = 0) -> None:
        """``fitness``: one value, or one per objective (all minimised); ``rung``: the hurdle
        rung the candidate ended at (below ``final_rung``: stopped early, a pruned trial)."""
        self.seen.add(proposal.genome.key)
        values = list(fitness) if isinstance(fitness, tuple) else [fitness]
        intermediate: dict[int, float] = {}
        if not all(math.isfinite(v) for v in values):
            state, told = TrialState.FAIL, None
        elif rung < self.final_rung:
            state, told = TrialState.PRUNED, None
            # Optuna keeps intermediate values for one objective only; with several, a pruned
            # trial still ranks below every complete one.
            if len(values) == 1:
                intermediate = {rung: values[0]}
        else:
            state, told = TrialState.COMPLETE, values
        trial = self.trials.pop(id(proposal), None)
        if trial is not None:
            for step, value in intermediate.items():
                trial.report(value, step)
            self.study.tell(trial, told, state=state)
        else:  # a result from an earlier session (resume): add it as a finished trial, a
            # pruned one holding its last intermediate value, as a live tell leaves it
            self.study.add_trial(optuna.trial.create_trial(
                params=self._params(proposal.genome), distributions=self.distributions,
                values=told or list(intermediate.values()) or None,
                intermediate_values=intermediate, state=state))
