"""The whole model: caches, decoding equivalence, presets' sizes, training signal."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from chimera.config import PRESETS, BlockType, ChimeraConfig
from chimera.model import Chimera, param_counts_analytic, param_counts_of
from chimera.recurrent import RecurrentCache


def _config(**genes) -> ChimeraConfig:
    base = dict(vocab_size=53, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                ffn_multiplier=2.0, window_size=8, max_seq_len=256)
    return ChimeraConfig(**{**base, **genes})


def _incremental_logits(model, tokens, chunks):
    """Run ``tokens`` through the cache in the given chunk sizes, then one token at a time."""
    cache = model.init_cache(tokens.shape[0])
    outputs, start = [], 0
    for size in chunks:
        logits, cache = model(tokens[:, start:start + size], cache)
        outputs.append(logits)
        start += size
    for t in range(start, tokens.shape[1]):
        logits, cache = model(tokens[:, t:t + 1], cache)
        outputs.append(logits)
    assert cache.position == tokens.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("ratio,window,length,chunks", [
    (2, 8, 40, [13]),          # R R A, prefill longer than the window
    (1, 5, 23, [4, 6]),        # R A, prefill then a multi-token chunk over a non-empty cache
    (3, 4, 30, [1]),           # R R R A, decoding from the first token
    (0, 64, 30, [10]),         # attention only, window longer than the sequence
    (2, 3, 50, [20, 9]),       # tiny window, many wraps of the ring buffer
])
def test_prefill_then_decoding_equals_one_full_forward(ratio, window, length, chunks):
    model = Chimera(_config(recurrence_ratio=ratio, window_size=window)).eval()
    tokens = torch.randint(0, 53, (2, length))
    full, none_cache = model(tokens)
    assert none_cache is None
    torch.testing.assert_close(_incremental_logits(model, tokens, chunks), full,
                               rtol=1e-4, atol=1e-4)


def test_block_pattern_follows_the_recurrence_ratio():
    R, A = BlockType.RECURRENT, BlockType.ATTENTION
    assert _config(n_layers=8, recurrence_ratio=3).block_types == (R, R, R, A, R, R, R, A)
    assert _config(n_layers=3, recurrence_ratio=0).pattern == "AAA"
    assert _config(n_layers=2, recurrence_ratio=5).pattern == "RR"
    model = Chimera(_config(n_layers=6, recurrence_ratio=2))
    assert [b.block_type for b in model.blocks] == list(_config(n_layers=6).block_types)


def test_recurrent_decoding_state_is_constant_size():
    model = Chimera(_config(recurrence_ratio=5, n_layers=2)).eval()
    cache = model.init_cache(1)
    shapes = [tuple(t.shape) for layer in cache.layers for t in layer]
    with torch.no_grad():
        for t in range(30):
            _, cache = model(torch.tensor([[t % 53]]), cache)
    assert all(isinstance(layer, RecurrentCache) for layer in cache.layers)
    assert [tuple(t.shape) for layer in cache.layers for t in layer] == shapes
    assert all(layer.state.dtype == torch.float32 for layer in cache.layers)


# (preset, published total parameters, tolerance): the CPU presets are "about 1M / 5M".
PUBLISHED_SIZES = [("small", 106e6, 0.10), ("medium", 230e6, 0.10), ("base", 1.5e9, 0.10),
                   ("tiny", 1e6, 0.20), ("mini", 5e6, 0.20)]


@pytest.mark.parametrize("name,published,tolerance", PUBLISHED_SIZES)
def test_preset_parameter_counts_match_the_published_sizes(name, published, tolerance):
    counts = param_counts_of(PRESETS[name])  # built on the meta device: no memory allocated
    assert abs(counts.total - published) / published < tolerance
    assert counts.embedding == PRESETS[name].vocab_size * PRESETS[name].d_model


def test_published_presets_have_the_published_shapes():
    small = PRESETS["small"]
    assert (small.n_layers, small.d_model, small.pattern.count("R")) == (12, 768, 8)
    assert (PRESETS["medium"].pattern.count("R"), PRESETS["medium"].pattern.count("A"),
            PRESETS["medium"].n_heads) == (11, 5, 16)
    assert (PRESETS["base"].pattern.count("R"), PRESETS["base"].pattern.count("A"),
            PRESETS["base"].d_model) == (18, 6, 2048)
    assert all(PRESETS[n].vocab_size == 32_000 for n in ("small", "medium", "base"))


def test_param_counts_on_meta_equal_a_real_model():
    config = _config(tie_embeddings=False)
    model = Chimera(config)
    real = sum(p.numel() for p in model.parameters())
    counts = param_counts_of(config)
    assert counts.total == real
    assert counts.embedding == 2 * 53 * 32  # untied: the output head counts as embedding


def test_analytic_parameter_count_equals_the_built_model():
    import random

    rng = random.Random(0)
    for _ in range(40):
        heads = rng.choice([1, 2, 4, 8])
        config = _config(d_model=heads * rng.choice([2, 4, 6, 8]), n_heads=heads,
                         n_kv_heads=rng.choice([k for k in (1, 2, 4, 8) if heads % k == 0]),
                         n_layers=rng.randint(1, 7), recurrence_ratio=rng.randint(0, 4),
                         ffn_multiplier=rng.choice([1.5, 2.0, 3.3]),
                         tie_embeddings=rng.random() < 0.5,
                         lru_width=rng.choice([None, heads * 4]), conv_width=rng.randint(1, 5))
        assert param_counts_analytic(config) == param_counts_of(config), config
    for preset in PRESETS.values():
        assert param_counts_analytic(preset) == param_counts_of(preset)


def test_tied_embeddings_share_one_matrix():
    model = Chimera(_config(tie_embeddings=True))
    assert model.lm_head is None and model.output_weight is model.embed.weight
    untied = Chimera(_config(tie_embeddings=False))
    assert untied.output_weight is not untied.embed.weight


def test_model_learns_a_repeating_sequence():
    model = Chimera(_config(dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.arange(33).remainder(7).repeat(4, 1)
    losses = []
    for _ in range(60):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_is_active_in_training_only():
    model = Chimera(_config(dropout=0.5))
    tokens = torch.randint(0, 53, (1, 12))
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Chimera(_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_is_frozen_and_replace_revalidates():
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 64
    with pytest.raises(ValueError, match="n_heads"):
        dataclasses.replace(config, d_model=30)


@pytest.mark.parametrize("genes", [
    dict(recurrence_ratio=0),  # attention only
    dict(recurrence_ratio=2, n_layers=3),  # R R A
    dict(recurrence_ratio=3, n_layers=3, mlp_type="gelu", tie_embeddings=False),  # R R R
    dict(recurrence_ratio=1, mlp_type="relu2", parallel_block=True, qk_norm=True),
])
def test_training_flops_per_token_match_torch_flop_counter(genes):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from chimera.model import training_flops_per_token

    # The window covers the sequence, so attention computes every causal pair as counted. The
    # counter sees attention's matmuls only on the math path (not in the fused CPU kernel).
    config = _config(window_size=32, **genes)
    torch.manual_seed(0)
    model = Chimera(config)
    tokens = torch.randint(0, config.vocab_size, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counted = counter.get_total_flops() / tokens[:, 1:].numel()
    assert training_flops_per_token(config, 31) == pytest.approx(counted, rel=0.05)


def test_training_flops_grow_with_the_attended_window_not_past_it():
    from chimera.model import training_flops_per_token

    config = _config(recurrence_ratio=1, window_size=16)  # 2 attention layers of d_model 32
    short, long = (training_flops_per_token(config, t) for t in (8, 64))
    assert long - short == 12 * 2 * 32 * (16 - 8)  # 8 more keys per token, no more past 16
    assert training_flops_per_token(config, 16) == long
