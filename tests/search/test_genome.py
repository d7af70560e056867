"""Genomes, spaces and operators: always valid, deterministic per seed."""

import dataclasses
import random

import pytest

from chimera.config import ChimeraConfig
from search.genome import CPU, PUBLISHED, Genome, get_space, preset_seeds
from search.operators import crossover, mutate, recombine


def _valid(genome: Genome, space) -> bool:
    ChimeraConfig(vocab_size=space.vocab_size, **genome.to_dict())  # raises if invalid
    in_ranges = all(getattr(genome, g) in space.values(g) for g in genome.to_dict())
    fits = space.max_params is None or space.params(genome) <= space.max_params
    return in_ranges and fits


@pytest.mark.parametrize("space", [CPU, PUBLISHED], ids=lambda s: s.name)
def test_operators_always_yield_valid_genomes(space):
    rng = random.Random(0)
    population = [space.sample(rng) for _ in range(20)]
    for _ in range(150):
        a, b = rng.sample(population, 2)
        child = mutate(a, space, rng) if rng.random() < 0.5 else crossover(a, b, space, rng)
        assert _valid(child, space), child
        population.append(child)


def test_operators_are_deterministic_per_seed():
    def run(seed):
        rng = random.Random(seed)
        genome = CPU.sample(rng)
        out = []
        for _ in range(30):
            other = CPU.sample(rng)
            genome = mutate(crossover(genome, other, CPU, rng), CPU, rng)
            out.append(genome)
        return out

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_mutation_changes_the_genome_a_little():
    rng = random.Random(1)
    for _ in range(50):
        parent = CPU.sample(rng)
        child = mutate(parent, CPU, rng)
        assert child != parent
        changed = [g for g, v in parent.to_dict().items() if child.to_dict()[g] != v]
        assert 1 <= len(changed) <= 4  # one gene, plus what repair adjusts with it


def test_recombination_takes_every_gene_from_some_parent_and_mixes_them():
    rng = random.Random(2)
    parents = [dataclasses.replace(CPU.sample(rng), dropout=d, mlp_type=m, rope_theta=r)
               for d, m, r in ((0.0, "swiglu", 10_000.0), (0.05, "gelu", 10_000.0),
                               (0.1, "relu2", 10_000.0))]
    children = [recombine(parents, CPU, rng) for _ in range(200)]
    for gene in ("dropout", "mlp_type", "ffn_multiplier", "window_size", "qk_norm"):
        values = {getattr(child, gene) for child in children}
        assert values <= {getattr(p, gene) for p in parents}  # nothing new: no mutation
    assert {c.dropout for c in children} == {0.0, 0.05, 0.1}  # every parent contributes
    assert {c.rope_theta for c in children} == {10_000.0}  # what all share, every child keeps
    assert len({(c.dropout, c.mlp_type) for c in children}) > 3  # genes mixed independently


def test_repair_fixes_divisibility_and_the_parameter_budget():
    broken = Genome(d_model=100, n_layers=30, n_heads=7, n_kv_heads=3, ffn_multiplier=9.0,
                    recurrence_ratio=9, window_size=1000, dropout=0.5)
    fixed = CPU.repair(broken)
    assert _valid(fixed, CPU)
    assert fixed.d_model % fixed.n_heads == 0 and fixed.n_heads % fixed.n_kv_heads == 0
    assert CPU.repair(fixed) == fixed  # idempotent


def test_genome_hash_is_canonical():
    genome = CPU.sample(random.Random(5))
    same = Genome.from_dict(dict(reversed(list(genome.to_dict().items()))))
    assert same.key == genome.key and len(genome.key) == 16
    other = mutate(genome, CPU, random.Random(0))
    assert other.key != genome.key


def test_presets_warm_start_inside_the_space():
    seeds = preset_seeds(CPU)
    assert len(seeds) >= 3 and all(_valid(s, CPU) for s in seeds)
    assert len({s.key for s in seeds}) == len(seeds)


def test_published_space_has_the_published_ranges():
    assert (min(PUBLISHED.d_model), max(PUBLISHED.d_model)) == (512, 2048)
    assert (min(PUBLISHED.n_layers), max(PUBLISHED.n_layers)) == (6, 24)
    assert (min(PUBLISHED.recurrence_ratio), max(PUBLISHED.recurrence_ratio)) == (1, 5)
    assert (min(PUBLISHED.window_size), max(PUBLISHED.window_size)) == (256, 2048)
    assert max(PUBLISHED.dropout) == 0.15
    with pytest.raises(ValueError, match="unknown search space"):
        get_space("huge")


def test_genomes_that_build_the_same_model_share_a_key():
    import torch

    from chimera.model import Chimera

    all_recurrent = Genome(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2.0,
                           recurrence_ratio=2, window_size=32, dropout=0.0)
    twin = dataclasses.replace(all_recurrent, recurrence_ratio=4, n_kv_heads=2, window_size=128,
                               qk_norm=True, rope_theta=100_000.0)
    assert twin.key == all_recurrent.key
    torch.manual_seed(0)
    a = Chimera(all_recurrent.to_config(vocab_size=64, max_seq_len=16))
    torch.manual_seed(0)
    b = Chimera(twin.to_config(vocab_size=64, max_seq_len=16))
    tokens = torch.randint(0, 64, (2, 16))
    assert torch.equal(a(tokens)[0], b(tokens)[0])  # the same model, so one key
    # With an attention block the same genes do matter, and so do the keys.
    hybrid = dataclasses.replace(all_recurrent, recurrence_ratio=1)
    assert dataclasses.replace(hybrid, window_size=128).key != hybrid.key
    assert dataclasses.replace(all_recurrent, n_heads=4).key != all_recurrent.key  # RG-LRU heads
    # A mutation always changes the model, not only a gene it does not express.
    rng = random.Random(0)
    assert all(mutate(all_recurrent, CPU, rng).key != all_recurrent.key for _ in range(50))
