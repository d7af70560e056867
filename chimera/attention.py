"""Sliding-window grouped-query attention with RoPE.

A query at position p sees keys at positions p - window + 1 .. p. Three paths, one semantics:

* whole sequence, T <= window: plain causal ``scaled_dot_product_attention``.
* whole sequence, T > window: blocked local attention. Query blocks attend only to the keys
  that can fall in their window, so the cost is O(T * window) instead of O(T^2).
  Either, given each token's document (``segments``), keeps a query inside its own.
* decoding with a cache: keys and values live in a ring buffer of exactly ``window`` slots
  (position p in slot p % window), so the cache never grows past the window. Like HF's static
  cache, the buffers are written in place (a copy per step would cost as much as the attention
  itself at long windows) and the same cache is returned: always continue from the returned one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.config import ChimeraConfig
from chimera.documents import Documents
from chimera.layers import RMSNorm, RotaryEmbedding, apply_rotary


class AttentionCache(NamedTuple):
    """Ring buffers of the last ``window`` keys and values (post-RoPE)."""

    keys: Tensor  # (B, n_kv_heads, window, head_dim); position p lives in slot p % window
    values: Tensor


def window_mask(query_pos: Tensor, key_pos: Tensor, window: int) -> Tensor:
    """True where a query may attend to a key: 0 <= query_pos - key_pos < window."""
    delta = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)
    return (delta >= 0) & (delta < window)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int, block: int | None = None,
                    segments: Tensor | None = None) -> Tensor:
    """Causal sliding-window attention over whole sequences.

    q: (B, H, T, hd); k, v: (B, Hkv, T, hd); returns (B, H, T, hd). ``segments`` (B, T): a
    query attends only to keys of its own segment (document); None: one segment.

    The first ``window`` positions see everything before them: one causal call. Every later
    query block of ``block`` positions starting at s sees keys s - window .. s + block - 1, so all
    of those blocks share one (block, block + window) band mask and run as a single 4-D call with
    (batch, block) folded into the batch dimension; 4-D inputs keep SDPA on its fused CPU kernel.
    A smaller block wastes less on masked keys (block / (block + window)) but copies each key
    more often; a quarter of the window measured best (bench/model_throughput.py).
    """
    length = q.shape[2]
    if length <= window:
        return _causal_attention(q, k, v, segments)
    block = block or max(1, window // 4)
    head = _causal_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window],
                             None if segments is None else segments[:, :window])

    batch, n_heads, _, head_dim = q.shape
    n_blocks = -(-(length - window) // block)
    padded = window + n_blocks * block
    # Queries window.. in blocks: (B * n_blocks, H, block, hd)
    qb = F.pad(q[:, :, window:], (0, 0, 0, padded - length))
    qb = qb.unflatten(2, (n_blocks, block)).transpose(1, 2).flatten(0, 1)

    def key_windows(t: Tensor) -> Tensor:
        # Block b (queries from window + b*block) reads keys b*block .. b*block + block + window.
        t = F.pad(t, (0, 0, 0, padded - length)).unfold(2, block + window, block)
        return t.permute(0, 2, 1, 4, 3).flatten(0, 1)  # (B * n_blocks, Hkv, block + window, hd)

    i = torch.arange(block, device=q.device).unsqueeze(1)
    j = torch.arange(block + window, device=q.device)
    band = (j > i) & (j <= i + window)  # query i of a block at key j: 0 <= window + i - j < window
    if segments is not None:  # (B * n_blocks, 1, block, block + window): band and same document
        padded_segments = F.pad(segments, (0, padded - length), value=-1)
        query_segments = padded_segments[:, window:].unflatten(1, (n_blocks, block))
        key_segments = padded_segments.unfold(1, block + window, block)
        same = query_segments.unsqueeze(-1) == key_segments.unsqueeze(-2)
        band = (band & same).flatten(0, 1).unsqueeze(1)
    rest = F.scaled_dot_product_attention(qb, key_windows(k), key_windows(v), attn_mask=band,
                                          enable_gqa=True)
    rest = rest.unflatten(0, (batch, n_blocks)).transpose(1, 2).flatten(2, 3)
    return torch.cat([head, rest[:, :, :length - window]], dim=2)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor | None) -> Tensor:
    """Full causal attention, within each segment when ``segments`` (B, T) is given."""
    if segments is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    same = segments.unsqueeze(-1) == segments.unsqueeze(-2)  # (B, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same).unsqueeze(1),
                                          enable_gqa=True)


class SlidingWindowAttention(nn.Module):
    def __init__(self, config: ChimeraConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.window = config.window_size
        kv_dim = config.n_kv_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_ntk_scale,
                                      table_length=config.max_seq_len)
        # QK-norm bounds attention logits (no softmax saturation at high learning rates).
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype
                   ) -> AttentionCache:
        shape = (batch_size, self.n_kv_heads, self.window, self.head_dim)
        return AttentionCache(torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: Tensor, position: int, cache: AttentionCache | None = None,
                documents: Documents | None = None) -> tuple[Tensor, AttentionCache | None]:
        """x: (B, T, d_model) holding positions ``position .. position + T - 1``; with
        ``documents``, each token attends only inside its own."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.cos_sin(position, length)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        first = None if documents is None else documents.first  # each token's document start
        if cache is None:
            out = local_attention(q, k, v, self.window, segments=first)
        elif length == 1:
            self._write(cache, k, v, position)
            out = self._decode_step(q, cache, position, first)
        else:
            out = (local_attention(q, k, v, self.window, segments=first) if position == 0
                   else self._attend_with_history(q, k, v, position, cache, first))
            self._write(cache, k, v, position)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.out_proj(out), cache

    def _decode_step(self, q: Tensor, cache: AttentionCache, position: int,
                     first: Tensor | None) -> Tensor:
        # After the write the ring holds positions max(0, p - window + 1) .. p: exactly the
        # window. Softmax does not care about key order, so the ring needs no reordering and
        # no mask; before it fills up, the valid slots are 0 .. p. Inside documents, the slots
        # holding positions before this row's document start are masked.
        filled = min(position + 1, self.window)
        mask = None
        if first is not None:
            slots = torch.arange(filled, device=q.device)
            slot_positions = position - (position - slots) % self.window
            mask = (slot_positions >= first[:, -1:]).view(-1, 1, 1, filled)
        return F.scaled_dot_product_attention(q, cache.keys[:, :, :filled],
                                              cache.values[:, :, :filled], attn_mask=mask,
                                              enable_gqa=True)

    def _attend_with_history(self, q: Tensor, k: Tensor, v: Tensor, position: int,
                             cache: AttentionCache, first: Tensor | None) -> Tensor:
        """Several new tokens after a non-empty cache (chunked prefill, a chat turn)."""
        held = min(position, self.window)
        first_held = position - held
        slots = torch.arange(first_held, position, device=q.device) % self.window
        keys = torch.cat([cache.keys[:, :, slots], k], dim=2)  # time-ordered
        values = torch.cat([cache.values[:, :, slots], v], dim=2)
        query_pos = torch.arange(position, position + q.shape[2], device=q.device)
        key_pos = torch.arange(first_held, position + q.shape[2], device=q.device)
        mask = window_mask(query_pos, key_pos, self.window)
        if first is not None:  # (B, 1, T, keys): and not before the query's document start
            mask = (mask & (key_pos >= first.unsqueeze(-1))).unsqueeze(1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def _write(self, cache: AttentionCache, k: Tensor, v: Tensor, position: int) -> None:
        """Store positions position..position+T-1 (only the last ``window`` matter)."""
        length = k.shape[2]
        if length == 1:  # decoding: one slot, no index tensors
            slot = position % self.window
            cache.keys[:, :, slot] = k[:, :, 0]
            cache.values[:, :, slot] = v[:, :, 0]
            return
        keep = min(length, self.window)
        slots = torch.arange(position + length - keep, position + length, device=k.device)
        slots = slots % self.window
        cache.keys.index_copy_(2, slots, k[:, :, length - keep:].to(cache.keys.dtype))
        cache.values.index_copy_(2, slots, v[:, :, length - keep:].to(cache.values.dtype))
