"""Genetic operators: pure functions of their inputs and an explicit RNG, always returning a
valid (repaired) genome of the space."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from search.genome import GENES, Genome, SearchSpace, nearest_value

STEP_PROBABILITY = 0.7  # a mutated gene moves to a neighbouring value; otherwise it is resampled


def mutate(genome: Genome, space: SearchSpace, rng: random.Random, n_genes: int = 1) -> Genome:
    """Change ``n_genes`` genes: each a small step (neighbouring value) or a resample. The
    result always builds a different model from the parent's when the space allows it (a
    change to a gene the parent does not express, like the window of an all-recurrent model,
    is tried again)."""
    for _ in range(10):
        genes = genome.to_dict()
        for gene in rng.sample(GENES, n_genes):
            values = space.values(gene)
            index = values.index(nearest_value(values, genes[gene]))
            if rng.random() < STEP_PROBABILITY and len(values) > 1:
                index = min(len(values) - 1, max(0, index + rng.choice((-1, 1))))
                genes[gene] = values[index]
            else:
                genes[gene] = rng.choice(values)
        child = space.repair(Genome(**genes))
        if child.key != genome.key:
            return child
    return child


def crossover(a: Genome, b: Genome, space: SearchSpace, rng: random.Random) -> Genome:
    """Uniform crossover: each gene from either parent with equal probability."""
    return recombine((a, b), space, rng)


def recombine(parents: Sequence[Genome], space: SearchSpace, rng: random.Random) -> Genome:
    """Each gene from one of ``parents``, drawn uniformly for every gene: uniform crossover for
    two, gene-pool recombination (Muehlenbein and Voigt, 1996) for a population's best few,
    whose shared values every child keeps and whose differences it mixes."""
    genes = {gene: getattr(parents[int(rng.random() * len(parents))], gene) for gene in GENES}
    return space.repair(dataclasses.replace(parents[0], **genes))
