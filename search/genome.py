"""Genomes and search spaces.

A ``Genome`` holds the architecture genes; a ``SearchSpace`` says which values each gene may
take. ``SearchSpace.repair`` maps any genome onto the nearest valid one (divisibility, ranges, a
parameter budget): constraints are repaired, never violated. Every genome has a canonical hash
of the genes its model expresses, the identity used to never train the same model twice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from chimera.config import PRESETS, ChimeraConfig, variant_suffix
from chimera.model import param_counts_analytic

GENES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_multiplier", "recurrence_ratio",
         "window_size", "dropout", "mlp_type", "qk_norm", "parallel_block", "tie_embeddings",
         "rope_theta")
# Genes added later, with the value every earlier genome had: a genome at these defaults keeps
# the key (and the summary) it had before they existed, so older runs resume and dedupe.
VARIANT_DEFAULTS = {"mlp_type": "swiglu", "qk_norm": False, "parallel_block": False,
                    "tie_embeddings": True, "rope_theta": 10_000.0}
# Genes only attention blocks read. (n_heads stays: the RG-LRU's gates are block-diagonal per
# head.)
ATTENTION_ONLY_GENES = ("n_kv_heads", "window_size", "qk_norm", "rope_theta")


@dataclass(frozen=True)
class Genome:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_multiplier: float
    recurrence_ratio: int
    window_size: int
    dropout: float
    mlp_type: str = "swiglu"
    qk_norm: bool = False
    parallel_block: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Genome:
        return cls(**{gene: data[gene] for gene in GENES if gene in data})  # defaults: older

    @classmethod
    def from_config(cls, config: ChimeraConfig) -> Genome:
        return cls(**{gene: getattr(config, gene) for gene in GENES})

    def expressed(self) -> dict:
        """The genes as the model sees them. With ``recurrence_ratio >= n_layers`` every block
        is recurrent: every such ratio builds the same model, and the attention genes build
        nothing. (Searches drift there: the small models that learn fastest are often all
        recurrent, and a third of one run's full-budget candidates were such twins.)"""
        genes = self.to_dict()
        if self.recurrence_ratio >= self.n_layers:
            genes["recurrence_ratio"] = self.n_layers
            for gene in ATTENTION_ONLY_GENES:
                del genes[gene]
        return genes

    @property
    def key(self) -> str:
        """Canonical hash of the expressed genes: genomes that build the same model have equal
        keys, across processes and runs."""
        genes = {gene: value for gene, value in self.expressed().items()
                 if VARIANT_DEFAULTS.get(gene, object()) != value}
        canonical = json.dumps(genes, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_config(self, vocab_size: int, max_seq_len: int) -> ChimeraConfig:
        return ChimeraConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **self.to_dict())

    def summary(self) -> str:
        """Compact, e.g. ``d384 L8 RRRA w256 h6 kv2 f3``."""
        period = "R" * self.recurrence_ratio + "A"
        return (f"d{self.d_model} L{self.n_layers} {period} w{self.window_size} "
                f"h{self.n_heads} kv{self.n_kv_heads} f{self.ffn_multiplier:g}"
                + variant_suffix(self.mlp_type, self.qk_norm, self.parallel_block,
                                 self.tie_embeddings, self.rope_theta))


def genome_changes(parent: Genome, child: Genome) -> str:
    """What ``child`` changed from ``parent``, e.g. ``d_model 128>160, dropout 0>0.1``: the
    genes both models read (a gene the model does not read is no change, and the attention
    genes of a model that became all-recurrent are no news beside its recurrence_ratio)."""
    before, after = parent.expressed(), child.expressed()
    return ", ".join(f"{gene} {_short(before[gene])}>{_short(after[gene])}" for gene in GENES
                     if gene in before and gene in after and before[gene] != after[gene])


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SearchSpace:
    """The values each gene may take (ordered, so 'a small step' means a neighbouring value)."""

    name: str
    d_model: tuple[int, ...]
    n_layers: tuple[int, ...]
    n_heads: tuple[int, ...]
    n_kv_heads: tuple[int, ...]
    ffn_multiplier: tuple[float, ...]
    recurrence_ratio: tuple[int, ...]
    window_size: tuple[int, ...]
    dropout: tuple[float, ...]
    mlp_type: tuple[str, ...] = ("swiglu",)
    qk_norm: tuple[bool, ...] = (False,)
    parallel_block: tuple[bool, ...] = (False,)
    tie_embeddings: tuple[bool, ...] = (True,)
    rope_theta: tuple[float, ...] = (10_000.0,)
    vocab_size: int = 4096  # for the parameter budget; the store's vocabulary in practice
    max_params: int | None = None  # total parameters, embedding included

    def values(self, gene: str) -> tuple:
        return getattr(self, gene)

    def sample(self, rng: random.Random) -> Genome:
        return self.repair(Genome(**{g: rng.choice(self.values(g)) for g in GENES}))

    def params(self, genome: Genome) -> int:
        return _total_params(genome, self.vocab_size)

    def repair(self, genome: Genome) -> Genome:
        """The nearest valid genome: each gene snapped to the space, heads dividing the width
        (with an even head size for RoPE), KV heads dividing heads, then shrunk (width first,
        then depth) until it fits the parameter budget."""
        genes = {g: nearest_value(self.values(g), getattr(genome, g)) for g in GENES}
        heads = [h for h in self.n_heads
                 if genes["d_model"] % h == 0 and (genes["d_model"] // h) % 2 == 0]
        genes["n_heads"] = nearest_value(heads or [1], genes["n_heads"])
        genes["n_kv_heads"] = nearest_value(
            [k for k in self.n_kv_heads if genes["n_heads"] % k == 0] or [1], genes["n_kv_heads"])
        repaired = Genome(**genes)
        if self.max_params is not None:
            while self.params(repaired) > self.max_params:
                smaller = self._shrink(repaired)
                if smaller == repaired:
                    break  # the smallest genome in the space; nothing left to shrink
                repaired = smaller
        return repaired

    def _shrink(self, genome: Genome) -> Genome:
        widths = [d for d in self.d_model if d < genome.d_model]
        depths = [n for n in self.n_layers if n < genome.n_layers]
        if widths and (genome.d_model >= 2 * min(self.d_model) or not depths):
            return self.repair(dataclasses.replace(genome, d_model=widths[-1]))
        if depths:
            return self.repair(dataclasses.replace(genome, n_layers=depths[-1]))
        return genome

    def contains(self, genome: Genome) -> bool:
        return self.repair(genome) == genome


@functools.lru_cache(maxsize=65_536)
def _total_params(genome: Genome, vocab_size: int) -> int:
    return param_counts_analytic(genome.to_config(vocab_size, max_seq_len=1)).total


def nearest_value(values: Sequence, value):
    """The value itself if allowed, else the numerically nearest (the first, for words)."""
    if value in values:
        return value
    if isinstance(value, str) or any(isinstance(v, str) for v in values):
        return values[0]
    return min(values, key=lambda v: (abs(v - value), v))


def _multiples(start: int, stop: int, step: int) -> tuple[int, ...]:
    return tuple(range(start, stop + 1, step))


# The published ranges of the Chimera seeds.
PUBLISHED = SearchSpace(
    name="published",
    d_model=_multiples(512, 2048, 128), n_layers=_multiples(6, 24, 1),
    n_heads=_multiples(4, 16, 1), n_kv_heads=_multiples(1, 8, 1),
    ffn_multiplier=(2.0, 2.5, 3.0, 3.5, 4.0), recurrence_ratio=_multiples(1, 5, 1),
    window_size=(256, 512, 768, 1024, 1536, 2048), dropout=(0.0, 0.05, 0.1, 0.15),
    mlp_type=("swiglu", "gelu", "relu2"), qk_norm=(False, True), parallel_block=(False, True),
    tie_embeddings=(True, False), rope_theta=(10_000.0, 100_000.0, 500_000.0),
    vocab_size=32_000)

# CPU-sized: candidates of ~0.1-2M parameters that train in seconds on one core.
CPU = SearchSpace(
    name="cpu",
    d_model=_multiples(64, 256, 32), n_layers=_multiples(2, 8, 1),
    n_heads=(2, 4, 8), n_kv_heads=(1, 2, 4),
    ffn_multiplier=(2.0, 2.5, 3.0, 3.5, 4.0), recurrence_ratio=_multiples(0, 4, 1),
    window_size=(32, 64, 128, 256), dropout=(0.0, 0.05, 0.1),
    mlp_type=("swiglu", "gelu", "relu2"), qk_norm=(False, True), parallel_block=(False, True),
    tie_embeddings=(True, False), rope_theta=(10_000.0, 100_000.0),
    vocab_size=1024, max_params=2_000_000)

SPACES = {space.name: space for space in (CPU, PUBLISHED)}


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; choose one of: "
                         f"{', '.join(SPACES)}") from None


def preset_seeds(space: SearchSpace) -> list[Genome]:
    """Warm start: the presets, repaired into the space (deduplicated, in preset order)."""
    seeds: list[Genome] = []
    for config in PRESETS.values():
        genome = space.repair(Genome.from_config(config))
        if genome not in seeds:
            seeds.append(genome)
    return seeds
