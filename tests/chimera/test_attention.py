"""Sliding-window attention: the window holds, the fast paths equal a plain masked reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from chimera.attention import SlidingWindowAttention, local_attention
from chimera.config import ChimeraConfig
from chimera.layers import RotaryEmbedding, apply_rotary


def reference_window_attention(q, k, v, window):
    """Dense softmax attention with an explicit window mask and repeated KV heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    pos = torch.arange(length)
    delta = pos[:, None] - pos[None, :]
    allowed = (delta >= 0) & (delta < window)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("length,window", [(5, 8), (8, 8), (9, 8), (40, 8), (37, 5), (64, 1)])
@pytest.mark.parametrize("block", [None, 1, 3, 8])
def test_local_attention_equals_dense_masked_reference(length, window, block):
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    torch.testing.assert_close(local_attention(q, k, v, window, block),
                               reference_window_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def _attention_layer(window: int) -> SlidingWindowAttention:
    config = ChimeraConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                           window_size=window, recurrence_ratio=0)
    return SlidingWindowAttention(config).eval()


@pytest.mark.parametrize("window", [4, 7, 16])
def test_token_further_back_than_the_window_does_not_change_the_output(window):
    layer = _attention_layer(window)
    length = 3 * window + 2
    x = torch.randn(1, length, 32)
    last = length - 1
    base, _ = layer(x, 0)

    outside = x.clone()
    outside[:, last - window] += 10.0  # exactly one step beyond the window of the last query
    changed_outside, _ = layer(outside, 0)
    torch.testing.assert_close(changed_outside[:, last], base[:, last])

    inside = x.clone()
    inside[:, last - window + 1] += 10.0  # the oldest token still inside the window
    changed_inside, _ = layer(inside, 0)
    assert not torch.allclose(changed_inside[:, last], base[:, last])


def test_decoding_cache_never_grows_past_the_window():
    layer = _attention_layer(window=6)
    cache = layer.init_cache(2, torch.device("cpu"), torch.float32)
    for position in range(20):
        _, cache = layer(torch.randn(2, 1, 32), position, cache)
        assert cache.keys.shape[2] == 6 and cache.values.shape[2] == 6


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, theta=10_000.0, table_length=50)
    q, k = torch.randn(16), torch.randn(16)

    def score(q_pos, k_pos):  # positions past the table (50) are computed on the fly
        cos_q, sin_q = rope.cos_sin(q_pos, 1)
        cos_k, sin_k = rope.cos_sin(k_pos, 1)
        return (apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score(10, 3), score(47, 40), rtol=1e-4, atol=1e-4)
    table_cos, _ = rope.cos_sin(45, 10)  # straddles the table's end
    assert table_cos.shape == (10, 16)


def test_ntk_scaling_keeps_the_highest_frequency_and_slows_the_lowest():
    plain = RotaryEmbedding(head_dim=64, theta=10_000.0)
    scaled = RotaryEmbedding(head_dim=64, theta=10_000.0, ntk_scale=4.0)
    assert scaled.inv_freq[0] == plain.inv_freq[0]
    ratio = plain.inv_freq[-1] / scaled.inv_freq[-1]
    assert 3.5 < ratio < 4.5  # lowest frequency slowed by ~ the scale factor


def test_attention_uses_sdpa_shapes_for_gqa():
    # n_kv_heads < n_heads: the fused projection is smaller than full multi-head attention.
    layer = _attention_layer(window=4)
    assert layer.qkv.out_features == 32 + 2 * 2 * 8
    out, _ = layer(torch.randn(3, 10, 32), 0)
    assert out.shape == (3, 10, 32)
    assert torch.isfinite(F.mse_loss(out, torch.zeros_like(out)))
