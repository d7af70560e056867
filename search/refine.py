"""Refinement: an Optuna study over the winning genome's training hyperparameters.

TPE proposes, the Hyperband pruner stops poor trials early: each trial trains in ``rungs``
equal parts and reports its validation bits per byte after each (the Hyperband resource is the
rung), so a trial the pruner gives up on costs only the rungs it ran. The first trial is the
defaults, so the study's best is never worse than what the search used, and the next few change
one knob at a time (``first_trials``) before TPE takes over.

The driver speaks Optuna's ask-and-tell interface and hands the training to a ``TrialRunner``
(in-process here; a pool of Ray actors in ``cluster.ray.trials``), so several trials run at once.
The study lives in an Optuna RDB storage (the run's database), so a crashed refinement resumes: its
finished and pruned trials stay, and the trials that were running are failed and asked again.
``optuna-dashboard sqlite:///RUN/results.db`` opens it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

# The hyperparameters refinement tunes. ``dropout`` is the genome's own gene; the rest are
# training hyperparameters.
TUNED = ("learning_rate", "warmup_fraction", "weight_decay", "batch_size", "beta2", "dropout",
         "schedule", "label_smoothing", "z_loss")


def search_space(defaults: dict) -> dict[str, Callable[[optuna.Trial], Any]]:
    """Each tuned hyperparameter's range, centred on the current values (``defaults``): the
    learning rate within 6x either way, the batch size halved, kept or doubled, the rest over
    their usual ranges (always containing the default, so the defaults are a valid trial)."""
    lr, batch = defaults["learning_rate"], defaults["batch_size"]
    batches = sorted({max(1, batch // 2), batch, batch * 2})
    z_losses = sorted({0.0, 1e-4, 1e-3, defaults["z_loss"]})

    def wide(name: str, low: float, high: float):
        low, high = min(low, defaults[name]), max(high, defaults[name])
        return lambda trial: trial.suggest_float(name, low, high)

    return {
        "learning_rate": lambda t: t.suggest_float("learning_rate", lr / 6, lr * 6, log=True),
        "warmup_fraction": wide("warmup_fraction", 0.0, 0.2),
        "weight_decay": wide("weight_decay", 0.0, 0.2),
        "batch_size": lambda t: t.suggest_categorical("batch_size", batches),
        "beta2": wide("beta2", 0.9, 0.999),
        "dropout": wide("dropout", 0.0, 0.1),
        "schedule": lambda t: t.suggest_categorical("schedule", ["cosine", "wsd"]),
        # Bits per byte reward calibrated predictions, which smoothing trades away: kept small.
        "label_smoothing": wide("label_smoothing", 0.0, 0.05),
        "z_loss": lambda t: t.suggest_categorical("z_loss", z_losses),
    }


def first_trials(defaults: dict) -> list[dict]:
    """The trials a study starts with: the current hyperparameters, then one change at a time
    to each of the knobs that most often matter (regularisation off, half the batch, twice the
    learning rate, the WSD schedule). With the handful of trials a promote can afford, TPE
    learns more from these probes around a known-good point than from as many random draws
    over nine dimensions."""
    probes = [dict(defaults),
              {**defaults, "dropout": 0.0, "label_smoothing": 0.0},
              {**defaults, "batch_size": max(1, defaults["batch_size"] // 2)},
              {**defaults, "learning_rate": defaults["learning_rate"] * 2},
              {**defaults, "schedule": "wsd" if defaults["schedule"] != "wsd" else "cosine"}]
    unique = []
    for probe in probes:
        if probe not in unique:
            unique.append(probe)
    return unique


@dataclass(frozen=True)
class RefineSettings:
    trials: int = 12
    rungs: int = 4  # reports per trial; Hyperband's max resource
    parallel: int = 2  # trials training at once
    seed: int = 0
    study_name: str = "refine"

    def __post_init__(self) -> None:
        if self.trials < 1 or self.rungs < 1 or self.parallel < 1:
            raise ValueError(f"trials, rungs and parallel must be positive, got {self.trials}, "
                             f"{self.rungs}, {self.parallel}")


@dataclass(frozen=True)
class TrialReport:
    number: int
    rung: int  # 1-based: the rung just finished
    value: float | None  # validation bpb; None when the trial failed
    error: str | None = None


class TrialRunner(Protocol):
    def start(self, number: int, params: dict) -> None:
        """Begin training trial ``number`` with these hyperparameters, up to rung 1."""

    def advance(self, number: int) -> None:
        """Train the trial on to its next rung."""

    def stop(self, number: int) -> None:
        """Drop the trial's training state (pruned, finished or failed)."""

    def next_report(self) -> TrialReport:
        """Block until some trial finishes a rung."""


def open_study(storage: str | optuna.storages.BaseStorage, settings: RefineSettings
               ) -> optuna.Study:
    """Create the study, or load it to resume."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.seed,
                                         n_startup_trials=max(3, settings.trials // 3))
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=settings.rungs,
                                            reduction_factor=3)
    return optuna.create_study(storage=storage, study_name=settings.study_name,
                               direction="minimize", sampler=sampler, pruner=pruner,
                               load_if_exists=True)


@dataclass
class RefineOutcome:
    best_params: dict
    best_value: float
    complete: int
    pruned: int
    failed: int


def refine(study: optuna.Study, runner: TrialRunner, settings: RefineSettings,
           defaults: dict, on_report: Callable[[TrialReport, str], None] | None = None
           ) -> RefineOutcome:
    """Run the study until ``settings.trials`` trials are complete or pruned. ``defaults``: the
    current hyperparameters (the names in ``TUNED``), tried first and the centre of the search
    space. ``on_report(report, verdict)`` sees every rung: verdict is continue, pruned,
    complete or failed."""
    space = search_space(defaults)
    _recover_crashed(study)
    if not study.trials:
        for params in first_trials({name: defaults[name] for name in TUNED})[:settings.trials]:
            study.enqueue_trial(params)

    def done() -> int:
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)

    live: dict[int, optuna.Trial] = {}

    def launch() -> None:
        trial = study.ask()
        live[trial.number] = trial
        runner.start(trial.number, {name: suggest(trial) for name, suggest in space.items()})

    def wanted() -> bool:  # more trials to start (a study where every trial fails gives up)
        failed = sum(t.state is TrialState.FAIL for t in study.trials)
        return done() + len(live) < settings.trials and failed < 2 * settings.trials

    while wanted() and len(live) < settings.parallel:
        launch()
    while live:
        report = runner.next_report()
        trial = live[report.number]
        if report.value is None:
            verdict = "failed"
            trial.set_user_attr("error", report.error or "unknown error")
            study.tell(trial, state=TrialState.FAIL)
        else:
            trial.report(report.value, report.rung)
            if report.rung >= settings.rungs:
                verdict = "complete"
                study.tell(trial, report.value)
            elif trial.should_prune():
                verdict = "pruned"
                study.tell(trial, state=TrialState.PRUNED)
            else:
                verdict = "continue"
        if on_report is not None:
            on_report(report, verdict)
        if verdict == "continue":
            runner.advance(report.number)
            continue
        runner.stop(report.number)
        del live[report.number]
        if wanted():
            launch()
    counts = collections.Counter(t.state for t in study.trials)
    if not counts[TrialState.COMPLETE]:
        raise RuntimeError("refinement finished no trial; see the failed trials' errors")
    return RefineOutcome(dict(study.best_params), study.best_value, counts[TrialState.COMPLETE],
                         counts[TrialState.PRUNED], counts[TrialState.FAIL])


def _recover_crashed(study: optuna.Study) -> None:
    """Trials left running by a crashed driver: failed, and their parameters asked again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, skip_if_exists=False)


class InProcessTrials:
    """Trials trained one rung at a time in this process (tests, ``--in-process``).

    ``train_rung(params, rung, state) -> (value, state)`` trains a trial from ``state`` (None at
    first) to the end of ``rung`` and returns its validation bpb (None: failed)."""

    def __init__(self, train_rung: Callable[[dict, int, Any], tuple[float | None, Any]]) -> None:
        self.train_rung = train_rung
        self.pending: collections.deque[int] = collections.deque()
        self.trials: dict[int, dict] = {}

    def start(self, number: int, params: dict) -> None:
        self.trials[number] = {"params": params, "rung": 0, "state": None}
        self.pending.append(number)

    def advance(self, number: int) -> None:
        self.pending.append(number)

    def stop(self, number: int) -> None:
        self.trials.pop(number, None)

    def next_report(self) -> TrialReport:
        number = self.pending.popleft()
        trial = self.trials[number]
        trial["rung"] += 1
        try:
            value, trial["state"] = self.train_rung(trial["params"], trial["rung"],
                                                    trial["state"])
            error = None if value is not None else "training failed"
        except Exception as err:  # noqa: BLE001 - a failed trial must not end the study
            value, error = None, f"{type(err).__name__}: {err}"
        return TrialReport(number, trial["rung"], value, error)
