"""Optuna refinement: defaults first, Hyperband prunes, the study resumes after a crash."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from search.refine import InProcessTrials, RefineSettings, first_trials, open_study, refine

DEFAULTS = dict(learning_rate=3e-3, warmup_fraction=0.1, weight_decay=0.1, batch_size=16,
                beta2=0.95, dropout=0.0, schedule="cosine", label_smoothing=0.0, z_loss=0.0)


def toy_rung(params, rung, state):
    """A loss that falls with each rung and is best at learning rate 1e-2."""
    quality = (math.log10(params["learning_rate"]) + 2) ** 2 + params["label_smoothing"]
    return quality + 1.0 / rung, (state or 0) + 1


def test_trials_are_pruned_and_defaults_come_first(tmp_path):
    settings = RefineSettings(trials=16, rungs=4, parallel=2, seed=1)
    study = open_study(f"sqlite:///{tmp_path / 'results.db'}", settings)
    verdicts = []
    outcome = refine(study, InProcessTrials(toy_rung), settings, DEFAULTS,
                     on_report=lambda report, verdict: verdicts.append(verdict))
    assert outcome.complete + outcome.pruned == 16 and outcome.failed == 0
    assert outcome.pruned >= 1 and "pruned" in verdicts
    assert study.trials[0].params == DEFAULTS
    second = study.trials[1].params  # then one knob at a time
    assert second == {**DEFAULTS, "label_smoothing": 0.0, "dropout": 0.0} or \
        sum(second[k] != DEFAULTS[k] for k in DEFAULTS) == 1
    assert [t.params for t in study.trials[1:4]] == first_trials(DEFAULTS)[1:4]
    pruned = [t for t in study.trials if t.state is TrialState.PRUNED]
    assert all(max(t.intermediate_values) < 4 for t in pruned)  # stopped before the end
    assert outcome.best_value < toy_rung(DEFAULTS, 4, None)[0]  # better than the defaults


def test_study_resumes_after_a_crash(tmp_path):
    storage = f"sqlite:///{tmp_path / 'results.db'}"
    settings = RefineSettings(trials=8, rungs=2, parallel=2, seed=0)
    reports = 0

    def crashing_rung(params, rung, state):
        nonlocal reports
        reports += 1
        if reports == 7:
            raise KeyboardInterrupt  # the driver dies mid-study (not a trial failure)
        return toy_rung(params, rung, state)

    with pytest.raises(KeyboardInterrupt):
        refine(open_study(storage, settings), InProcessTrials(crashing_rung), settings, DEFAULTS)
    before = optuna.load_study(study_name="refine", storage=storage)
    running = [t for t in before.trials if t.state is TrialState.RUNNING]
    finished = [t for t in before.trials if t.state.is_finished()]
    assert running and finished
    # A new driver on the same storage: keeps the finished trials, retries the crashed ones.
    outcome = refine(open_study(storage, settings), InProcessTrials(toy_rung), settings,
                     DEFAULTS)
    after = optuna.load_study(study_name="refine", storage=storage)
    assert outcome.complete + outcome.pruned == 8
    for trial in finished:  # kept as they were
        assert after.trials[trial.number].state == trial.state
        assert after.trials[trial.number].intermediate_values == trial.intermediate_values
    failed = [t for t in after.trials if t.state is TrialState.FAIL]
    assert {t.number for t in failed} == {t.number for t in running}
    retried = [t.params for t in after.trials if t.number > max(x.number for x in running)]
    assert all(t.params in retried for t in running)


def test_failed_trials_are_recorded_not_fatal(tmp_path):
    settings = RefineSettings(trials=4, rungs=2, parallel=1)

    def sometimes(params, rung, state):
        if params["batch_size"] == 8:
            raise RuntimeError("out of memory")
        return toy_rung(params, rung, state)

    study = open_study(f"sqlite:///{tmp_path / 'r.db'}", settings)
    outcome = refine(study, InProcessTrials(sometimes), settings, DEFAULTS)
    assert outcome.complete >= 1
    assert outcome.failed == sum(t.params["batch_size"] == 8 for t in study.trials)
