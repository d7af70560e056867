"""The transformers classes (chimera.hf): a native model directory through the Auto classes,
the native model's logits, loss and greedy generation, padding, and save_pretrained's way back."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import chimera  # noqa: F401  (importing the package registers the Auto classes)
from chimera.checkpoint import load_model, save_model
from chimera.generation import SamplingConfig, generate
from chimera.hf import ChimeraForCausalLM, from_native
from chimera.hf_config import ChimeraHFConfig
from chimera.model import Chimera


@pytest.fixture
def saved(tiny_config, tmp_path):
    model = Chimera(tiny_config).eval()
    save_model(model, tmp_path / "model")
    return model, tmp_path / "model"


def test_a_native_directory_loads_through_the_auto_classes(saved, no_network):
    model, directory = saved
    assert isinstance(AutoConfig.from_pretrained(directory), ChimeraHFConfig)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert isinstance(hf, ChimeraForCausalLM)
    assert hf.config.to_chimera() == model.config
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        native = model(tokens)[0]
        out = hf(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, native, atol=1e-5, rtol=0)
    expected = F.cross_entropy(native[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_labels_of_minus_100_are_left_out_of_the_loss(saved):
    model, _ = saved
    hf = from_native(model).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 20))
    labels = tokens.clone()
    labels[:, :12] = -100  # a prompt the loss ignores
    with torch.no_grad():
        native = model(tokens)[0]
        loss = hf(tokens, labels=labels).loss
    torch.testing.assert_close(loss, F.cross_entropy(native[0, 11:-1], tokens[0, 12:]))


def test_save_pretrained_is_read_back_by_the_native_loader_and_the_auto_classes(saved,
                                                                              tmp_path):
    model, directory = saved
    hf = AutoModelForCausalLM.from_pretrained(directory)
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, model.config.vocab_size, (1, 30))
    again = load_model(tmp_path / "hf").eval()  # chimera generate / serve read it
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens)[0], model(tokens)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens)[0], atol=1e-6, rtol=0)


def test_padded_rows_score_as_they_would_alone(saved):
    model, _ = saved
    hf = from_native(model).eval()
    tokens = torch.randint(1, model.config.vocab_size, (3, 16))
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0  # left padding
    mask[2, 11:] = 0  # right padding
    with torch.no_grad():
        logits = hf(tokens, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], model(tokens[:1])[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1, 5:], model(tokens[1:2, 5:])[0][0], atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(logits[2, :11], model(tokens[2:, :11])[0][0], atol=1e-5,
                                   rtol=0)
    holes = torch.ones_like(tokens)
    holes[0, 7] = 0
    with pytest.raises(ValueError, match="one run of ones"):
        hf(tokens, attention_mask=holes)


def test_greedy_generate_equals_native_generation(saved):
    model, _ = saved
    hf = from_native(model).eval()
    prompt = [3, 14, 15, 9, 2, 6]
    native = generate(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0))
    cached = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    assert cached[0, len(prompt):].tolist() == native
    recomputed = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                             use_cache=False)
    assert recomputed[0].tolist() == cached[0].tolist()


def test_sampling_generates_and_beam_search_is_refused(saved):
    model, _ = saved
    hf = from_native(model).eval()
    prompt = torch.tensor([[3, 14, 15], [9, 2, 6]])  # two prompts of one length: a batch
    torch.manual_seed(1)
    first = hf.generate(prompt, max_new_tokens=20, do_sample=True, top_k=10, temperature=0.9)
    torch.manual_seed(1)
    again = hf.generate(prompt, max_new_tokens=20, do_sample=True, top_k=10, temperature=0.9)
    assert first.shape == (2, 23) and torch.equal(first, again)
    assert int(first.max()) < model.config.vocab_size
    with pytest.raises(ValueError, match="beam search"):
        hf.generate(prompt, max_new_tokens=5, num_beams=2)


def test_importing_chimera_registers_without_loading_transformers_modeling():
    """PreTrainedModel's import costs about two of torch's: only a transformers user pays it,
    not every chimera command (nor TRL's or lm-eval's, loaded by the commands that use them)."""
    import subprocess
    import sys

    code = ("import sys, chimera, cluster.cli.main; from transformers import AutoConfig; "
            "print(type(AutoConfig.for_model('chimera')).__name__, *(m in sys.modules for m in "
            "('transformers.modeling_utils', 'trl', 'lm_eval', 'datasets')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["ChimeraHFConfig", "False", "False", "False", "False"]
