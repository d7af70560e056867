"""Full pretraining: exact resume, atomic checkpoints, the recipe's schedules and losses."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from chimera.config import ChimeraConfig
from chimera.model import Chimera
from chimera.tokenizer import train_char
from trainers.checkpoints import CheckpointManager, CheckpointStateError
from trainers.corpus import CorpusSpec, iter_documents
from trainers.fit import FitSettings, fit
from trainers.plateau import PlateauDecay
from trainers.pretrain import PretrainPlan, StoreBatches, measure_tokens_per_second, pretrain
from trainers.recipe import TrainHparams, evaluate, learning_rate_at, lm_loss
from trainers.store import prepare_store

CORPUS = CorpusSpec("stories", stories_bytes=30_000, seed=0)
HPARAMS = TrainHparams(batch_size=4, seq_len=32, eval_batches=2, learning_rate=3e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tokenizer = train_char(iter_documents(CORPUS))
    return prepare_store(CORPUS, tokenizer, tmp_path_factory.mktemp("s") / "store")[0]


def _plan(store, steps=8, hparams=HPARAMS, **fit):
    config = ChimeraConfig(vocab_size=store.vocab_size, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=16, max_seq_len=64, dropout=0.1)
    return PretrainPlan(config, hparams, FitSettings(steps=steps, grad_accum=2, **fit), seed=3)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_an_uninterrupted_one(store, tmp_path, optimizer):
    plan = _plan(store, eval_every=4, hparams=replace(HPARAMS, optimizer=optimizer))
    straight, straight_result = pretrain(plan, store, tmp_path / "a")
    # Stop at step 3 (as Ctrl+C would), then resume in a fresh model from the checkpoint.
    _, first = pretrain(plan, store, tmp_path / "b", stop_after=3)
    assert first.interrupted and first.step == 3
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG
    resumed, resumed_result = pretrain(plan, store, tmp_path / "b")
    assert resumed_result.step == 8 and not resumed_result.interrupted
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert resumed_result.history.train == straight_result.history.train
    assert resumed_result.history.val == straight_result.history.val


def test_checkpoints_keep_the_last_k_and_refuse_another_plan(store, tmp_path):
    plan = _plan(store, steps=6, checkpoint_every=1, keep_checkpoints=2)
    pretrain(plan, store, tmp_path)
    names = [p.name for p in CheckpointManager(tmp_path).paths()]
    assert names == ["step-00000005.pt", "step-00000006.pt"]
    other = _plan(store, steps=7)
    with pytest.raises(CheckpointStateError, match="another run"):
        pretrain(other, store, tmp_path)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(store, tmp_path):
    plan = _plan(store, steps=2)
    pretrain(plan, store, tmp_path)
    before = CheckpointManager(tmp_path).latest()
    # A process that starts writing a newer checkpoint and is killed halfway through.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from trainers.checkpoints import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r})
        state = manager.load(manager.latest())
        state.step = 99
        def dying_save(obj, f):
            with open(f, "wb") as out:
                out.write(b"half a checkpoint" * 1000)
                out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        manager.save(state)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(),
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the torn write
    manager = CheckpointManager(tmp_path)
    assert manager.latest() == before
    assert manager.load(before).step == 2
    _, resumed = pretrain(plan, store, tmp_path)  # and the run still loads it
    assert resumed.step == 2


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointStateError, match="not a readable checkpoint"):
        CheckpointManager.load(bad)


def test_loss_falls_and_batch_must_split(store):
    _, result = pretrain(_plan(store, steps=30), store)
    losses = [loss for _, loss, _ in result.history.train]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result.val_loss is not None and result.history.tokens == 30 * 4 * 32
    bad = PretrainPlan(_plan(store).config, HPARAMS, FitSettings(steps=2, grad_accum=3))
    with pytest.raises(ValueError, match="does not split"):
        pretrain(bad, store)


def test_wsd_schedule_holds_then_decays():
    hp = TrainHparams(learning_rate=1.0, warmup_fraction=0.1, schedule="wsd",
                      decay_fraction=0.2, min_lr_fraction=0.0)
    assert learning_rate_at(0.05, hp) == pytest.approx(0.5)
    assert learning_rate_at(0.5, hp) == 1.0 and learning_rate_at(0.79, hp) == 1.0
    assert learning_rate_at(0.9, hp) == pytest.approx(0.5)
    assert learning_rate_at(1.0, hp) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        TrainHparams(schedule="linear")


def test_loss_mask_label_smoothing_and_z_loss():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]])
    picked = torch.nn.functional.cross_entropy(logits[mask.bool()], targets[mask.bool()])
    assert lm_loss(logits, targets, mask) == pytest.approx(picked.item())
    z = torch.logsumexp(logits, -1).square().mean()
    assert lm_loss(logits, targets, z_loss=0.1) == pytest.approx(
        (lm_loss(logits, targets) + 0.1 * z).item(), rel=1e-5)
    assert lm_loss(logits, targets, label_smoothing=0.1) != lm_loss(logits, targets)


class _TurnsToNoise(StoreBatches):
    """The store's text for the first steps, then uniform random tokens: validation loss on
    the text falls, then rises as the model unlearns it (a stand-in for overfitting)."""

    def batch(self, step):
        if step < 6:
            return super().batch(step)
        generator = torch.Generator().manual_seed(step)
        shape = (self.hparams.batch_size, self.hparams.seq_len + 1)
        return torch.randint(0, self.store.vocab_size, shape, generator=generator), None


def test_keep_best_ends_with_the_best_evaluations_weights(store):
    torch.manual_seed(0)
    model = Chimera(_plan(store).config)
    source = _TurnsToNoise(store, HPARAMS, 0)
    result = fit(model, HPARAMS, source, FitSettings(steps=24, eval_every=3, keep_best=True))
    losses = dict(result.history.val)
    best_step = min(losses, key=losses.get)
    assert best_step < result.step, losses  # the loss did rise: the test means something
    assert result.history.best_step == best_step
    assert result.val_loss == losses[best_step] < losses[result.step]
    again = evaluate(model, source.validation(), torch.device("cpu"))
    assert again == pytest.approx(losses[best_step], rel=1e-5)


def test_a_plateau_brings_the_decay_forward_to_the_best_evaluations_tokens(store):
    torch.manual_seed(0)
    model = Chimera(_plan(store).config)
    source = _TurnsToNoise(store, HPARAMS, 0)
    evaluated, loaded = {}, []

    def remember(report):  # the weights of every evaluation, to know what the decay starts from
        if report.val_loss is not None:
            evaluated[report.step] = {k: v.clone() for k, v in model.state_dict().items()}

    real_load = model.load_state_dict
    model.load_state_dict = lambda state, **kw: loaded.append(state) or real_load(state, **kw)
    settings = FitSettings(steps=60, eval_every=3, keep_best=True, plateau_patience=2)
    result = fit(model, HPARAMS, source, settings, on_step=remember)
    history, plateau = result.history, result.history.plateau
    losses = dict(history.val)
    best_step = min(losses, key=losses.get)
    assert best_step > 3, losses  # there is an evaluation before the best: the test needs one
    # Two evaluations without a new best begin the decay; it trains the stretch from the
    # evaluation before the best to the best again (3 steps), and training ends, far short of 60.
    start_step = best_step + 2 * 3
    assert plateau["start"] == pytest.approx(start_step / 60)
    assert result.step == start_step + 3
    # It starts from the weights of the evaluation before the best ...
    for name, tensor in evaluated[best_step - 3].items():
        assert torch.equal(loaded[0][name], tensor), name
    # ... at the schedule's rate there, falling linearly towards the floor.
    rates = [lr for step, _, lr in history.train if step > start_step]
    assert rates[0] == pytest.approx(learning_rate_at((best_step - 3) / 60, HPARAMS))
    drops = [a - b for a, b in zip(rates, rates[1:])]
    assert all(d > 0 for d in drops) and max(drops) == pytest.approx(min(drops), rel=1e-6)
    assert result.history.best_step == best_step  # noise after it: the best stays the best


def test_the_plateau_decay_timing():
    decay = PlateauDecay(patience=2)
    model = torch.nn.Linear(2, 2)
    for loss, progress in ((3.0, 0.1), (2.0, 0.2), (2.5, 0.3)):
        assert not decay.observe(loss, progress, HPARAMS, model)
    assert decay.learning_rate(0.35, HPARAMS) == learning_rate_at(0.35, HPARAMS)
    assert decay.observe(2.4, 0.4, HPARAMS, model)  # the second without a new best
    assert (decay.start, decay.end) == (0.4, pytest.approx(0.5))  # 0.1 to 0.2 again
    assert decay.learning_rate(0.4, HPARAMS) == learning_rate_at(0.1, HPARAMS)
    floor = HPARAMS.learning_rate * HPARAMS.min_lr_fraction
    assert decay.learning_rate(0.5, HPARAMS) == pytest.approx(floor)
    assert not decay.finished(0.49) and decay.finished(0.5)
    assert PlateauDecay.from_dict(decay.to_dict()).to_dict() == decay.to_dict()


def test_a_run_resumed_in_its_plateau_decay_decays_as_an_uninterrupted_one(store, tmp_path):
    def run(**kw):
        torch.manual_seed(0)
        model = Chimera(_plan(store).config)
        settings = FitSettings(steps=60, eval_every=3, keep_best=True, plateau_patience=2)
        return fit(model, HPARAMS, _TurnsToNoise(store, HPARAMS, 0), settings, tmp_path,
                   meta={"run": 1}, on_message=lambda line: None, **kw)

    straight = run()
    shutil.rmtree(tmp_path)
    stop = round(straight.history.plateau["start"] * 60) + 2
    assert run(stop_after=stop).interrupted
    resumed = run()
    assert resumed.step == straight.step
    assert resumed.history.plateau == straight.history.plateau
    assert resumed.history.train == straight.history.train
    assert resumed.history.val == straight.history.val


def test_a_plateau_decay_needs_the_best_weights():
    with pytest.raises(ValueError, match="keep_best"):
        FitSettings(steps=10, eval_every=2, plateau_patience=2)


def test_without_keep_best_the_last_step_is_kept(store):
    _, result = pretrain(_plan(store, steps=4, eval_every=2), store)
    assert result.history.best_step is None
    assert result.val_loss == result.history.val[-1][1]


def test_the_measured_training_speed_counts_only_the_timed_steps(store, monkeypatch):
    import trainers.pretrain as pretrain_module
    calls = []
    real_step = pretrain_module.train_step
    monkeypatch.setattr(pretrain_module, "train_step",
                        lambda *a, **k: calls.append(k["step"]) or real_step(*a, **k))
    rate = measure_tokens_per_second(_plan(store).config, HPARAMS, store, steps=2, warmup=1)
    assert calls == [0, 1, 2] and rate > 0


class _Clock:
    """A stand-in for ``time.perf_counter`` that each training batch moves on a second, so a
    clock-budgeted run's length and schedule are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _TimedBatches(StoreBatches):
    def __init__(self, store, hparams, seed, clock: _Clock) -> None:
        super().__init__(store, hparams, seed)
        self.clock = clock

    def batch(self, step):
        self.clock.now += 1.0  # the step's second
        return super().batch(step)


def _timed_fit(store, monkeypatch, settings, checkpoints=None, stop_after=None):
    import trainers.steps as steps_module
    clock = _Clock()
    monkeypatch.setattr(steps_module, "time", clock)
    torch.manual_seed(0)
    model = Chimera(_plan(store).config)
    return fit(model, HPARAMS, _TimedBatches(store, HPARAMS, 0, clock), settings, checkpoints,
               stop_after=stop_after)


def test_a_clock_budget_trains_until_its_seconds_are_spent_on_a_schedule_that_follows_them(
        store, monkeypatch):
    result = _timed_fit(store, monkeypatch, FitSettings(steps=1000, seconds=10))
    assert result.step == 10  # a second a step: the clock, not the 1000 steps, ended it
    # Step k ran where the clock stood before it, k-1 seconds of 10: the schedule of 10 steps.
    lrs = [lr for _, _, lr in result.history.train]
    assert lrs == pytest.approx([learning_rate_at(k / 10, HPARAMS) for k in range(10)])
    # The step count caps a clock that would run on.
    assert _timed_fit(store, monkeypatch, FitSettings(steps=4, seconds=10)).step == 4


def test_a_resumed_clock_budget_continues_the_clock_it_saved(store, monkeypatch, tmp_path):
    settings = FitSettings(steps=1000, seconds=10, checkpoint_every=1)
    straight = _timed_fit(store, monkeypatch, settings, tmp_path / "a")
    first = _timed_fit(store, monkeypatch, settings, tmp_path / "b", stop_after=4)
    assert first.interrupted and first.step == 4
    resumed = _timed_fit(store, monkeypatch, settings, tmp_path / "b")
    assert resumed.step == straight.step == 10
    assert [lr for *_, lr in resumed.history.train] == \
        pytest.approx([lr for *_, lr in straight.history.train])
