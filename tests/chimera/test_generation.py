"""Generation: sampling filters, determinism, stop tokens, streaming."""

import pytest
import torch

from chimera.config import ChimeraConfig
from chimera.generation import (
    SamplingConfig,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate,
    stream,
)
from chimera.model import Chimera


@pytest.fixture
def model(tiny_config):
    return Chimera(tiny_config).eval()


def test_greedy_generation_equals_argmax_of_full_forwards(model):
    prompt = [3, 14, 15, 9, 2]
    new = generate(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    assert new == tokens[len(prompt):]


def test_same_seed_same_sample_and_different_seed_differs(model):
    settings = dict(max_new_tokens=30, temperature=1.5)
    first = generate(model, [1, 2], SamplingConfig(**settings, seed=7))
    again = generate(model, [1, 2], SamplingConfig(**settings, seed=7))
    other = generate(model, [1, 2], SamplingConfig(**settings, seed=8))
    assert first == again and first != other


def test_streaming_yields_tokens_one_at_a_time_and_stops_at_a_stop_token(model):
    sampling = SamplingConfig(max_new_tokens=40, temperature=0)
    full = generate(model, [5, 6, 7], sampling)
    stop = full[4]
    first_stop = full.index(stop)
    iterator = stream(model, [5, 6, 7], SamplingConfig(max_new_tokens=40, temperature=0,
                                                       stop_tokens=(stop,)))
    assert next(iterator) == full[0]  # a real generator: tokens come before the end
    assert [full[0], *iterator] == full[:first_stop + 1]


def test_generation_runs_past_max_seq_len_with_bounded_caches():
    config = ChimeraConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                           recurrence_ratio=1, window_size=4, max_seq_len=8)
    out = generate(Chimera(config), [1, 2, 3], SamplingConfig(max_new_tokens=30, seed=0))
    assert len(out) == 30 and all(0 <= t < 20 for t in out)


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    kept = torch.isfinite(filter_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(filter_top_p(probs.log(), 0.1)).sum() == 1  # top token always kept


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0]]


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=0))
    penalised = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=0,
                                                         repetition_penalty=5.0))
    assert len(set(penalised)) >= len(set(plain))
    assert plain != penalised


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(max_new_tokens=-1),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_settings_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_bad_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 999])
