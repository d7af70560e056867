"""The Chimera architecture genes: one frozen dataclass, its validation rules and the presets.

Everything about a model's shape lives here as plain data. The layer pattern is derived from
``recurrence_ratio`` (``block_types``), so a genome in the search maps one-to-one onto a config.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass
from typing import Any

MLP_TYPES = ("swiglu", "gelu", "relu2")


def variant_suffix(mlp_type: str, qk_norm: bool, parallel_block: bool, tie_embeddings: bool,
                   rope_theta: float) -> str:
    """The summary words for genes away from their defaults, e.g. `` gelu qkn par``."""
    words = [mlp_type] if mlp_type != "swiglu" else []
    words += ["qkn"] * qk_norm + ["par"] * parallel_block + ["untied"] * (not tie_embeddings)
    words += [f"rope{rope_theta:g}"] if rope_theta != 10_000.0 else []
    return "".join(f" {w}" for w in words)


class BlockType(str, enum.Enum):
    """The temporal-mixing layer of one residual block."""

    RECURRENT = "R"  # Griffin recurrent block (RG-LRU)
    ATTENTION = "A"  # sliding-window grouped-query attention


@dataclass(frozen=True)
class ChimeraConfig:
    """Every architecture gene of a Chimera model. Change with ``dataclasses.replace``."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 1
    ffn_multiplier: float = 3.0
    # Recurrent layers per attention layer: 2 gives R R A R R A ...; 0 gives attention only.
    recurrence_ratio: int = 2
    window_size: int = 256
    dropout: float = 0.0
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    # NTK-aware RoPE scaling factor (1.0 = none); >1 stretches the usable context by ~that factor.
    rope_ntk_scale: float = 1.0
    tie_embeddings: bool = True
    mlp_type: str = "swiglu"  # swiglu | gelu | relu2 (squared ReLU, Primer)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE
    # One pre-norm feeding mixer and MLP side by side (GPT-J / PaLM): x + mixer(n(x)) + mlp(n(x))
    parallel_block: bool = False
    # Width of the RG-LRU state; None means d_model.
    lru_width: int | None = None
    conv_width: int = 4
    norm_eps: float = 1e-6
    # The token that starts each packed document (the store's end-of-text): there the RG-LRU
    # resets and the conv and attention read nothing earlier. None: windows mix documents.
    document_token: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def lru_dim(self) -> int:
        return self.d_model if self.lru_width is None else self.lru_width

    @property
    def ffn_hidden(self) -> int:
        """MLP hidden width: ffn_multiplier * d_model rounded up to a multiple of 8."""
        return 8 * math.ceil(self.ffn_multiplier * self.d_model / 8)

    @property
    def block_types(self) -> tuple[BlockType, ...]:
        """The layer pattern: ``recurrence_ratio`` recurrent blocks, then one attention block."""
        period = self.recurrence_ratio + 1
        return tuple(
            BlockType.ATTENTION if (i + 1) % period == 0 else BlockType.RECURRENT
            for i in range(self.n_layers)
        )

    @property
    def pattern(self) -> str:
        """The layer pattern as a string, e.g. ``RRARRA``."""
        return "".join(t.value for t in self.block_types)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the offending gene and the rule it breaks."""

        def fail(gene: str, rule: str) -> None:
            raise ValueError(f"invalid ChimeraConfig: {gene}={getattr(self, gene)!r}: {rule}")

        for gene in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "window_size", "max_seq_len", "conv_width"):
            value = getattr(self, gene)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(gene, "must be a positive integer")
        if self.vocab_size < 2:
            fail("vocab_size", "must be at least 2")
        if self.d_model % self.n_heads:
            fail("n_heads", f"d_model ({self.d_model}) must be divisible by n_heads")
        if self.head_dim % 2:
            fail("n_heads", f"head_dim d_model/n_heads ({self.head_dim}) must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"n_heads ({self.n_heads}) must be divisible by n_kv_heads")
        if not (isinstance(self.ffn_multiplier, (int, float)) and 0 < self.ffn_multiplier <= 16):
            fail("ffn_multiplier", "must be a number in (0, 16]")
        if (isinstance(self.recurrence_ratio, bool) or not isinstance(self.recurrence_ratio, int)
                or self.recurrence_ratio < 0):
            fail("recurrence_ratio", "must be an integer >= 0 (0 means attention only)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            fail("dropout", "must be in [0, 1)")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be positive")
        if not self.rope_ntk_scale >= 1.0:
            fail("rope_ntk_scale", "must be >= 1.0 (1.0 disables NTK scaling)")
        if self.lru_width is not None:
            if isinstance(self.lru_width, bool) or not isinstance(self.lru_width, int) \
                    or self.lru_width < 1:
                fail("lru_width", "must be a positive integer or None")
            if self.lru_width % self.n_heads:
                fail("lru_width", f"must be divisible by n_heads ({self.n_heads}): the RG-LRU "
                                  "gates are block-diagonal with one block per head")
        if not self.norm_eps > 0:
            fail("norm_eps", "must be positive")
        if self.document_token is not None and (
                isinstance(self.document_token, bool) or not isinstance(self.document_token, int)
                or not 0 <= self.document_token < self.vocab_size):
            fail("document_token", f"must be None or a token id below vocab_size "
                                   f"({self.vocab_size})")
        if self.mlp_type not in MLP_TYPES:
            fail("mlp_type", f"must be one of {', '.join(MLP_TYPES)}")
        for gene in ("tie_embeddings", "qk_norm", "parallel_block"):
            if not isinstance(getattr(self, gene), bool):
                fail(gene, "must be true or false")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChimeraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ChimeraConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def summary(self) -> str:
        """A compact one-line description, e.g. ``d384 L8 RRA w256 h6 kv2``."""
        period = self.pattern[: self.recurrence_ratio + 1] if self.recurrence_ratio else "A"
        return (f"d{self.d_model} L{self.n_layers} {period} w{self.window_size} "
                f"h{self.n_heads} kv{self.n_kv_heads} ffn{self.ffn_multiplier:g}"
                + variant_suffix(self.mlp_type, self.qk_norm, self.parallel_block,
                                 self.tie_embeddings, self.rope_theta))


# The published Chimera sizes (32k vocabulary) and two CPU-sized presets for search and tests.
PRESETS: dict[str, ChimeraConfig] = {
    "tiny": ChimeraConfig(vocab_size=4096, d_model=112, n_layers=4, n_heads=4, n_kv_heads=2,
                          ffn_multiplier=3.0, recurrence_ratio=1, window_size=128,
                          max_seq_len=512),
    "mini": ChimeraConfig(vocab_size=4096, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2,
                          ffn_multiplier=3.0, recurrence_ratio=2, window_size=256,
                          max_seq_len=2048),
    "small": ChimeraConfig(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12,
                           n_kv_heads=4, ffn_multiplier=3.0, recurrence_ratio=2,
                           window_size=1024, max_seq_len=4096),
    "medium": ChimeraConfig(vocab_size=32_000, d_model=1024, n_layers=16, n_heads=16,
                            n_kv_heads=4, ffn_multiplier=3.0, recurrence_ratio=2,
                            window_size=1024, max_seq_len=4096),
    "base": ChimeraConfig(vocab_size=32_000, d_model=2048, n_layers=24, n_heads=16,
                          n_kv_heads=4, ffn_multiplier=4.0, recurrence_ratio=3,
                          window_size=2048, max_seq_len=8192),
}


def get_preset(name: str) -> ChimeraConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
