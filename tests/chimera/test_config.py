"""Config validation names the gene and the rule."""

import pytest

from chimera.config import ChimeraConfig, get_preset


@pytest.mark.parametrize("genes,gene,rule", [
    (dict(d_model=100, n_heads=3), "n_heads", "divisible"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads", "divisible"),
    (dict(d_model=12, n_heads=4), "n_heads", "even"),
    (dict(d_model=0), "d_model", "positive"),
    (dict(n_layers=0), "n_layers", "positive"),
    (dict(vocab_size=1), "vocab_size", "at least 2"),
    (dict(ffn_multiplier=0.0), "ffn_multiplier", "(0, 16]"),
    (dict(recurrence_ratio=-1), "recurrence_ratio", ">= 0"),
    (dict(window_size=0), "window_size", "positive"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(dropout=-0.1), "dropout", "[0, 1)"),
    (dict(max_seq_len=0), "max_seq_len", "positive"),
    (dict(rope_theta=0.0), "rope_theta", "positive"),
    (dict(rope_ntk_scale=0.5), "rope_ntk_scale", ">= 1.0"),
    (dict(lru_width=30, n_heads=4), "lru_width", "divisible by n_heads"),
    (dict(n_layers=2.5), "n_layers", "integer"),
    (dict(conv_width=0), "conv_width", "positive"),
])
def test_invalid_config_raises_value_error_naming_the_gene(genes, gene, rule):
    with pytest.raises(ValueError) as err:
        ChimeraConfig(**genes)
    assert f"{gene}=" in str(err.value)
    assert rule in str(err.value)


def test_config_round_trips_through_a_dict():
    config = ChimeraConfig(d_model=64, n_heads=8, lru_width=96, tie_embeddings=False)
    assert ChimeraConfig.from_dict(config.to_dict()) == config


def test_unknown_fields_and_presets_are_rejected_by_name():
    with pytest.raises(ValueError, match="bogus"):
        ChimeraConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_summary_is_compact():
    config = ChimeraConfig(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, recurrence_ratio=3,
                           window_size=256)
    assert config.summary() == "d384 L8 RRRA w256 h6 kv2 ffn3"
