"""The Chimera language model: a Griffin-style stack of recurrent and sliding-window attention
blocks, each followed by a SwiGLU MLP, pre-norm residuals, optional tied embeddings.

``forward(tokens, cache=None) -> (logits, cache)``. Without a cache it runs whole sequences
(training). Decoding passes a cache from ``init_cache`` and continues from the one returned;
caches are NamedTuples handed in and out, never kept on the modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.attention import AttentionCache, SlidingWindowAttention
from chimera.config import BlockType, ChimeraConfig
from chimera.documents import Documents, find_documents
from chimera.layers import RMSNorm, make_mlp, mlp_params
from chimera.recurrent import RecurrentBlock, RecurrentCache

LayerCache = RecurrentCache | AttentionCache


class ChimeraCache(NamedTuple):
    layers: tuple[LayerCache, ...]
    position: int  # tokens consumed so far; the next token has this position
    # (B,) int64: where each row's current document began (models with a document_token only)
    document_start: Tensor | None = None


class ParamCounts(NamedTuple):
    embedding: int  # token embedding, plus the output head when it is not tied
    non_embedding: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is recurrent or attention.
    Parallel: x + mixer(norm(x)) + mlp(norm(x)) with the one norm."""

    def __init__(self, config: ChimeraConfig, block_type: BlockType) -> None:
        super().__init__()
        self.block_type = block_type
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = (RecurrentBlock(config) if block_type is BlockType.RECURRENT
                      else SlidingWindowAttention(config))
        self.mlp_norm = None if config.parallel_block else RMSNorm(config.d_model,
                                                                    config.norm_eps)
        self.mlp = make_mlp(config.d_model, config.ffn_hidden, config.mlp_type)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, position: int, cache: LayerCache | None,
                documents: Documents | None = None) -> tuple[Tensor, LayerCache | None]:
        normed = self.mixer_norm(x)
        if self.block_type is BlockType.RECURRENT:
            mixed, cache = self.mixer(normed, cache, documents)
        else:
            mixed, cache = self.mixer(normed, position, cache, documents)
        if self.mlp_norm is None:  # parallel: the MLP reads the same normalised input
            return x + self.dropout(mixed) + self.dropout(self.mlp(normed)), cache
        x = x + self.dropout(mixed)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, cache


class Chimera(nn.Module):
    def __init__(self, config: ChimeraConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ResidualBlock(config, t) for t in config.block_types)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections shrunk by 1/sqrt(2L) so the
        residual stream's variance does not grow with depth. Blocks' own parameters (conv,
        RG-LRU gates and Lambda, norms) keep the init their modules gave them."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("out_proj", "mlp.down"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else 0.02)

    @property
    def output_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def init_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> ChimeraCache:
        weight = self.embed.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        layers = tuple(block.mixer.init_cache(batch_size, device, dtype) for block in self.blocks)
        document_start = (None if self.config.document_token is None
                          else torch.zeros(batch_size, dtype=torch.long, device=device))
        return ChimeraCache(layers, 0, document_start)

    def forward(self, tokens: Tensor, cache: ChimeraCache | None = None
                ) -> tuple[Tensor, ChimeraCache | None]:
        """tokens: (B, T) int64 -> logits (B, T, vocab), and the updated cache (or None)."""
        hidden, cache = self.hidden_states(tokens, cache)
        return F.linear(hidden, self.output_weight), cache

    def hidden_states(self, tokens: Tensor, cache: ChimeraCache | None = None
                      ) -> tuple[Tensor, ChimeraCache | None]:
        """The final-normed hidden states (B, T, d_model) the output head reads."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        position = 0 if cache is None else cache.position
        if cache is None and tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len="
                             f"{self.config.max_seq_len}")
        carried = None if cache is None else cache.document_start
        documents = find_documents(tokens, self.config.document_token, position, carried)
        x = self.embed(tokens)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, position, None if cache is None else cache.layers[i],
                                   documents)
            new_layers.append(layer_cache)
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, None
        document_start = carried if documents is None else documents.first[:, -1]
        return hidden, ChimeraCache(tuple(new_layers), position + tokens.shape[1],
                                    document_start)

    def param_counts(self) -> ParamCounts:
        return count_params(self)


def count_params(model: Chimera) -> ParamCounts:
    embedding = model.embed.weight.numel()
    if model.lm_head is not None:
        embedding += model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(embedding, total - embedding)


def param_counts_of(config: ChimeraConfig) -> ParamCounts:
    """Parameter counts of a config without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return count_params(Chimera(config))


def param_counts_analytic(config: ChimeraConfig) -> ParamCounts:
    """The same counts by formula, ~1000x faster than building the model (the search counts
    thousands of genomes); tests hold it equal to ``param_counts_of``."""
    d, w, f = config.d_model, config.lru_dim, config.ffn_hidden
    kv_dim = config.n_kv_heads * config.head_dim
    norms_and_mlp = (1 if config.parallel_block else 2) * d + mlp_params(d, f, config.mlp_type)
    recurrent = (2 * d * w + (config.conv_width + 1) * w  # in_proj, conv weight + bias
                 + 2 * w * w // config.n_heads + 2 * w  # block-diagonal gates + biases
                 + w + w * d)  # Lambda, out_proj
    attention = d * (d + 2 * kv_dim) + d * d + 2 * config.head_dim * config.qk_norm
    layers = sum(norms_and_mlp + (recurrent if t is BlockType.RECURRENT else attention)
                 for t in config.block_types)
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return ParamCounts(embedding, layers + d)


def training_flops_per_token(config: ChimeraConfig, seq_len: int) -> int:
    """Floating-point operations of one training token (forward and backward) on sequences of
    ``seq_len``, the PaLM appendix-B count: 6 per weight a token meets in a matmul (every
    non-embedding weight, and the output head's vocab x d_model whether tied or not; the input
    embedding is a lookup) plus 12 per attention layer, head dimension and attended position
    (QK^T and AV, forward and backward), a position attending min(window, seq_len) keys.
    Elementwise work (norms, gates, the scan) is left out; tests hold the count to torch's
    FlopCounterMode. A machine-independent cost: search budgets in it are comparable across
    machines and days, unlike wall-clock seconds."""
    counts = param_counts_analytic(config)
    matmul_weights = counts.non_embedding + config.vocab_size * config.d_model
    attention_layers = sum(t is BlockType.ATTENTION for t in config.block_types)
    attended = min(config.window_size, seq_len)
    return 6 * matmul_weights + 12 * attention_layers * config.n_heads * config.head_dim * attended


@torch.no_grad()
def resize_vocabulary(model: Chimera, vocab_size: int) -> Chimera:
    """A copy of ``model`` with a larger vocabulary: trained rows kept as they are, new rows (of
    the embedding and an untied head) set to the mean of the trained ones, so new tokens start
    as an 'average' token instead of noise that would dominate the first fine-tuning steps."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the model's {old}; "
                         f"shrinking would drop trained rows")
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    resized = Chimera(config).to(model.embed.weight.device, model.embed.weight.dtype)
    state = model.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        if name in state:
            rows = state[name]
            state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(
                vocab_size - old, -1)])
    resized.load_state_dict(state)
    return resized
