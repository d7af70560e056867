"""Candidate training: plain-data results, reproducible, never raising for a bad candidate."""

import dataclasses
import math

import pytest
import torch

from chimera.config import ChimeraConfig
from chimera.model import training_flops_per_token
from chimera.tokenizer import train_char
from trainers.candidate import (
    BudgetKind,
    CandidateResult,
    Status,
    TrainBudget,
    TrainHparams,
    learning_rate_at,
    train_candidate,
)
from trainers.corpus import CorpusSpec, iter_documents
from trainers.store import prepare_store

CORPUS = CorpusSpec("stories", stories_bytes=40_000, seed=0)
HPARAMS = TrainHparams(batch_size=4, seq_len=32, eval_batches=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tokenizer = train_char(iter_documents(CORPUS))
    return prepare_store(CORPUS, tokenizer, tmp_path_factory.mktemp("s") / "store")[0]


def _config(store, **genes):
    base = dict(vocab_size=store.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                window_size=16, max_seq_len=32)
    return ChimeraConfig(**{**base, **genes})


def test_token_budget_with_a_seed_is_reproducible(store):
    budget = TrainBudget(BudgetKind.TOKENS, 4 * 32 * 6)
    first = train_candidate(_config(store), store, budget, HPARAMS, seed=1)
    again = train_candidate(_config(store), store, budget, HPARAMS, seed=1)
    other = train_candidate(_config(store), store, budget, HPARAMS, seed=2)
    assert first.status is Status.OK and first.steps == 6 and first.tokens == 768
    assert first.val_loss == again.val_loss and first.loss_curve == again.loss_curve
    assert first.val_loss != other.val_loss


def test_result_holds_the_metrics_as_plain_data(store):
    result = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 12), HPARAMS)
    info = store.info("val")
    assert math.isclose(result.val_bpb, result.val_loss / math.log(2) * info.tokens / info.bytes)
    assert result.params > result.non_embedding_params > 0
    assert result.tokens_per_second > 0 and result.wall_seconds > 0 and result.peak_memory_mb > 0
    assert result.loss_curve[0][0] == 1 and result.loss_curve[-1][0] == 10
    data = result.to_dict()
    assert data["status"] == "ok" and type(result).from_dict(data) == result


def test_training_lowers_the_loss(store):
    short = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 2), HPARAMS)
    long = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 60),
                           dataclasses.replace(HPARAMS, learning_rate=1e-2))
    assert long.val_loss < short.val_loss - 0.5


def test_seconds_budget_stops_on_time(store):
    result = train_candidate(_config(store), store, TrainBudget(BudgetKind.SECONDS, 0.5), HPARAMS)
    assert result.status is Status.OK and result.steps >= 1 and result.wall_seconds < 5


def test_a_diverging_candidate_is_reported_not_raised(store):
    wild = dataclasses.replace(HPARAMS, learning_rate=1e6, grad_clip=1e9, warmup_fraction=0.0)
    result = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 40), wild)
    assert result.status is Status.DIVERGED and "step" in result.error
    assert result.val_bpb is None


def test_a_broken_candidate_is_reported_as_failed(store):
    too_small_vocab = _config(store, vocab_size=3)
    result = train_candidate(too_small_vocab, store, TrainBudget(BudgetKind.STEPS, 2), HPARAMS)
    assert result.status is Status.FAILED and "vocab_size" in result.error


def test_out_of_memory_is_its_own_status(store, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("trainers.candidate.Chimera", exhausted)
    result = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 2), HPARAMS)
    assert result.status is Status.OUT_OF_MEMORY


def test_schedule_warms_up_then_decays():
    hp = TrainHparams(learning_rate=1.0, warmup_fraction=0.1, min_lr_fraction=0.1)
    assert learning_rate_at(0.0, hp) == 0.0 and math.isclose(learning_rate_at(0.05, hp), 0.5)
    assert math.isclose(learning_rate_at(0.1, hp), 1.0)
    assert math.isclose(learning_rate_at(1.0, hp), 0.1)
    assert learning_rate_at(0.5, hp) > learning_rate_at(0.9, hp)


def test_continued_training_equals_uninterrupted_training(store):
    """A short rung kept and continued (through bytes, as between workers) ends exactly where
    one uninterrupted run of the same total steps does: weights, loss curve, validation loss.
    Dropout is on, so the RNG must travel with the state too."""
    from trainers.candidate import TrainingState

    config = _config(store, dropout=0.1)
    steps = TrainBudget(BudgetKind.STEPS, 12)
    whole = train_candidate(config, store, steps, HPARAMS, seed=3, keep_state=True)
    first = train_candidate(config, store, TrainBudget(BudgetKind.STEPS, 5), HPARAMS, seed=3,
                            schedule_steps=12, keep_state=True)
    resumed = TrainingState.from_bytes(first.state.to_bytes())
    assert resumed.step == 5
    rest = train_candidate(config, store, steps, HPARAMS, seed=3, resume=resumed,
                           keep_state=True)
    assert rest.status is Status.OK and rest.steps == 12
    for name, tensor in whole.state.model.items():
        assert torch.equal(tensor, rest.state.model[name]), name
    assert rest.val_loss == whole.val_loss
    assert first.loss_curve + rest.loss_curve == whole.loss_curve  # steps 1 | 10
    # FLOPs count the candidate's training so far, as tokens do: the continuation's include
    # the first rung's, and equal the uninterrupted run's.
    assert first.train_flops == 5 * 4 * 32 * training_flops_per_token(config, 32) > 0
    assert rest.train_flops == whole.train_flops == pytest.approx(12 / 5 * first.train_flops)
    # without the shared schedule the short rung would have annealed: a different model
    annealed = train_candidate(config, store, TrainBudget(BudgetKind.STEPS, 5), HPARAMS, seed=3,
                               keep_state=True)
    assert not torch.equal(annealed.state.model["embed.weight"], first.state.model["embed.weight"])


def test_result_data_leaves_the_training_state_out(store):
    result = train_candidate(_config(store), store, TrainBudget(BudgetKind.STEPS, 2), HPARAMS,
                             keep_state=True)
    assert result.state is not None and "state" not in result.to_dict()
    assert CandidateResult.from_dict(result.to_dict()).val_loss == result.val_loss
