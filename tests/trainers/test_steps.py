"""The optimizer step both loops share: it equals a plain hand-written step, accumulates
gradients, refuses a non-finite loss before the weights change, and keeps candidate results."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from chimera.config import ChimeraConfig
from chimera.model import Chimera
from chimera.tokenizer import train_char
from trainers.candidate import BudgetKind, Status, TrainBudget, train_candidate
from trainers.corpus import CorpusSpec, iter_documents
from trainers.recipe import TrainHparams, learning_rate_at, lm_loss, make_optimizer
from trainers.steps import (
    NonFiniteLoss,
    Throughput,
    accumulate_gradients,
    set_learning_rate,
    train_step,
)
from trainers.store import prepare_store

CPU = torch.device("cpu")
HPARAMS = TrainHparams(batch_size=4, seq_len=16, learning_rate=1e-2, grad_clip=0.5)


def _pair(config):
    """Two identical models, each with the recipe's optimizer."""
    model = Chimera(config)
    twin = copy.deepcopy(model)
    return (model, make_optimizer(model, HPARAMS)), (twin, make_optimizer(twin, HPARAMS))


def _batch(config, step, rows=4):
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, config.vocab_size, (rows, HPARAMS.seq_len + 1), generator=generator)


def _reference_step(model, optimizer, tokens, progress):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(progress, HPARAMS)
    logits, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                           reduction="none").mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), HPARAMS.grad_clip)
    optimizer.step()
    return loss.item()


def test_the_shared_step_equals_a_plain_step(tiny_config):
    (model, optimizer), (reference, reference_optimizer) = _pair(tiny_config)
    for step in range(3):
        tokens, progress = _batch(tiny_config, step), step / 3
        taken = train_step(model, optimizer, (tokens, None), HPARAMS, progress=progress,
                           step=step, device=CPU)
        assert taken.loss == _reference_step(reference, reference_optimizer, tokens, progress)
        assert taken.learning_rate == learning_rate_at(progress, HPARAMS)
    for (name, param), twin in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(param, twin), name


def test_accumulated_micro_batches_match_one_batch(tiny_config):
    (model, _), (accumulated, accumulated_optimizer) = _pair(tiny_config)
    tokens = _batch(tiny_config, 0)
    mask = torch.rand(tokens.shape[0], HPARAMS.seq_len, generator=torch.Generator()
                      .manual_seed(1)) < 0.5
    whole = accumulate_gradients(model, (tokens, None), HPARAMS, CPU)
    halves = accumulate_gradients(accumulated, (tokens, None), HPARAMS, CPU, grad_accum=2)
    assert halves.item() == pytest.approx(whole.item(), abs=1e-6)
    for (name, param), twin in zip(model.named_parameters(), accumulated.parameters()):
        assert torch.allclose(param.grad, twin.grad, atol=1e-6), name
    logits, _ = accumulated(tokens[:, :-1])  # a loss mask reaches the recipe's loss
    expected = lm_loss(logits, tokens[:, 1:], mask).item()
    masked = train_step(accumulated, accumulated_optimizer, (tokens, mask), HPARAMS,
                        progress=0.5, step=1, device=CPU)
    assert masked.loss == pytest.approx(expected, rel=1e-6)


def test_a_non_finite_loss_is_refused_before_the_weights_change(tiny_config):
    (model, optimizer), _ = _pair(tiny_config)
    train_step(model, optimizer, (_batch(tiny_config, 0), None), HPARAMS, progress=0.5,
               step=0, device=CPU)
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    weights["embed.weight"] = model.embed.weight.detach().clone()
    with pytest.raises(NonFiniteLoss, match="training diverged: loss nan at step 7") as caught:
        train_step(model, optimizer, (_batch(tiny_config, 1), None), HPARAMS, progress=0.5,
                   step=7, device=CPU)
    assert caught.value.step == 7 and isinstance(caught.value, FloatingPointError)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]) or name == "embed.weight", name
    assert torch.equal(model.embed.weight[1:], weights["embed.weight"][1:])
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, moments["state"][index][key]), (index, key)


def test_throughput_counts_tokens_over_the_time_since_a_restart():
    meter = Throughput()
    meter.add(100)
    assert meter.per_second(2.0) == 50.0 and meter.per_second() > 0
    meter.restart()
    assert meter.tokens == 0 and meter.per_second() == 0.0


def test_muon_takes_the_hidden_linear_weights_and_adamw_the_rest(tiny_config):
    model = Chimera(replace(tiny_config, tie_embeddings=False))
    optimizer = make_optimizer(model, replace(HPARAMS, optimizer="muon"))
    muon, adamw = optimizer.optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    owned = [{names[id(p)] for g in o.param_groups for p in g["params"]} for o in (muon, adamw)]
    assert owned[0] == {name for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and name != "lm_head"
                        for name in [f"{name}.weight"]}
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(names.values())
    assert {"embed.weight", "lm_head.weight", "blocks.0.mixer.conv_weight"} <= owned[1]
    assert muon.param_groups[0]["weight_decay"] == HPARAMS.weight_decay
    set_learning_rate(optimizer, 0.25)  # the schedule reaches both
    assert {g["lr"] for g in optimizer.param_groups} == {0.25}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_each_optimizer_fits_a_batch(tiny_config, name):
    model = Chimera(tiny_config)
    hparams = replace(HPARAMS, optimizer=name)
    optimizer, tokens = make_optimizer(model, hparams), _batch(tiny_config, 0)
    losses = [train_step(model, optimizer, (tokens, None), hparams, progress=0.5, step=step,
                         device=CPU).loss for step in range(25)]
    assert losses[-1] < 0.5 * losses[0]


# Candidate results must not move when the training loop is restructured: the validation loss
# of this candidate (seed 7, 12 steps, dropout on) measured before the shared step existed.
RECORDED_VAL_LOSS = 3.6874247789382935


def test_candidate_training_keeps_its_recorded_result(tmp_path):
    corpus = CorpusSpec("stories", stories_bytes=40_000, seed=0)
    store = prepare_store(corpus, train_char(iter_documents(corpus)), tmp_path / "store")[0]
    config = ChimeraConfig(vocab_size=store.vocab_size, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=16, max_seq_len=32, dropout=0.1)
    hparams = TrainHparams(batch_size=4, seq_len=32, eval_batches=2)
    result = train_candidate(config, store, TrainBudget(BudgetKind.STEPS, 12), hparams, seed=7)
    assert result.status is Status.OK and result.steps == 12
    assert result.val_loss == pytest.approx(RECORDED_VAL_LOSS, abs=1e-6)
