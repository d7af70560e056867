"""The architecture variants a genome can switch: MLP type, QK-norm, parallel blocks, untied
embeddings, RoPE base. Each changes the model as intended and keeps decoding exact."""

import dataclasses
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from chimera.config import ChimeraConfig
from chimera.layers import PlainMLP, SwiGLU
from chimera.model import Chimera, param_counts_analytic, param_counts_of
from search.genome import CPU, Genome

VARIANTS = [dict(mlp_type="gelu"), dict(mlp_type="relu2"), dict(qk_norm=True),
            dict(parallel_block=True), dict(tie_embeddings=False), dict(rope_theta=500.0),
            dict(mlp_type="relu2", qk_norm=True, parallel_block=True, tie_embeddings=False)]


def _config(tiny_config, **genes):
    return dataclasses.replace(tiny_config, **genes)


@pytest.mark.parametrize("genes", VARIANTS)
def test_parameter_count_formula_matches_the_built_model(tiny_config, genes):
    config = _config(tiny_config, **genes)
    assert param_counts_analytic(config) == param_counts_of(config)


@pytest.mark.parametrize("genes", VARIANTS)
def test_prefill_then_decode_equals_one_forward(tiny_config, genes):
    model = Chimera(_config(tiny_config, **genes)).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(tokens)
        logits, cache = model(tokens[:, :12], model.init_cache(2))
        steps = [logits]
        for t in range(12, 20):
            step, cache = model(tokens[:, t:t + 1], cache)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_mlp_types_compute_their_activation(tiny_config):
    x = torch.randn(2, 5, tiny_config.d_model)
    assert isinstance(Chimera(tiny_config).blocks[0].mlp, SwiGLU)
    for kind, act in (("gelu", lambda h: F.gelu(h, approximate="tanh")),
                      ("relu2", lambda h: F.relu(h) ** 2)):
        mlp = Chimera(_config(tiny_config, mlp_type=kind)).blocks[0].mlp
        assert isinstance(mlp, PlainMLP)
        torch.testing.assert_close(mlp(x), act(x @ mlp.up.weight.T) @ mlp.down.weight.T)
    swiglu = param_counts_analytic(tiny_config).non_embedding
    plain = param_counts_analytic(_config(tiny_config, mlp_type="gelu")).non_embedding
    assert swiglu - plain == tiny_config.n_layers * tiny_config.d_model * tiny_config.ffn_hidden


def _attention(config):
    model = Chimera(_config(config, recurrence_ratio=0)).eval()
    return model.blocks[0].mixer


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(tiny_config):
    x = torch.randn(2, 9, tiny_config.d_model)
    for qk_norm, invariant in ((True, True), (False, False)):
        attention = _attention(_config(tiny_config, qk_norm=qk_norm))
        with torch.no_grad():
            before, _ = attention(x, 0)
            qk_rows = tiny_config.d_model + tiny_config.n_kv_heads * tiny_config.head_dim
            attention.qkv.weight[:qk_rows] *= 10.0  # sharper logits, unless normalised
            after, _ = attention(x, 0)
        assert torch.allclose(before, after, atol=1e-4) is invariant


def test_parallel_block_feeds_one_norm_to_mixer_and_mlp(tiny_config):
    block = Chimera(_config(tiny_config, parallel_block=True)).blocks[0].eval()
    assert block.mlp_norm is None
    x = torch.randn(2, 7, tiny_config.d_model)
    with torch.no_grad():
        out, _ = block(x, 0, None)
        normed = block.mixer_norm(x)
        expected = x + block.mixer(normed, None)[0] + block.mlp(normed)
    torch.testing.assert_close(out, expected)


def test_untied_embeddings_get_their_own_output_head(tiny_config):
    tied, untied = Chimera(tiny_config), Chimera(_config(tiny_config, tie_embeddings=False))
    assert tied.output_weight is tied.embed.weight
    assert untied.output_weight is untied.lm_head.weight
    extra = tiny_config.vocab_size * tiny_config.d_model
    assert untied.param_counts().embedding - tied.param_counts().embedding == extra


def test_rope_base_changes_the_rotation_frequencies(tiny_config):
    low = _attention(_config(tiny_config, rope_theta=100.0)).rotary
    high = _attention(_config(tiny_config, rope_theta=1e6)).rotary
    cos_low, _ = low.cos_sin(0, 50)
    cos_high, _ = high.cos_sin(0, 50)
    torch.testing.assert_close(cos_low[..., 0], cos_high[..., 0])  # the fastest pair: same
    assert not torch.allclose(cos_low[..., -1], cos_high[..., -1])  # slower pairs differ


def test_genomes_switch_the_variants_and_old_genomes_keep_their_key():
    old = {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_multiplier": 3.0,
           "recurrence_ratio": 2, "window_size": 64, "dropout": 0.0}
    genome = Genome.from_dict(old)  # a genome recorded before the variant genes existed
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert genome.key == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    variant = dataclasses.replace(genome, mlp_type="relu2", qk_norm=True, parallel_block=True,
                                  tie_embeddings=False, rope_theta=100_000.0)
    assert variant.key != genome.key
    assert variant.summary().endswith("relu2 qkn par untied rope100000")
    config = variant.to_config(vocab_size=1024, max_seq_len=64)
    assert (config.mlp_type, config.qk_norm, config.parallel_block, config.tie_embeddings,
            config.rope_theta) == ("relu2", True, True, False, 100_000.0)
    assert CPU.repair(variant) == variant  # every variant is in the CPU space
    assert ChimeraConfig(**{**config.to_dict(), "mlp_type": "swiglu"}).mlp_type == "swiglu"
    with pytest.raises(ValueError, match="mlp_type"):
        dataclasses.replace(config, mlp_type="tanh")
