"""Where refinement trials train: in this process, or on a pool of Ray actors.

A trial trains the promoted genome with the hyperparameters Optuna proposed, for a token budget
split into rungs; after each rung it is scored on a fixed validation set (the same windows for
every batch size) and its training state stays with the worker until the pruner decides. Each
actor runs one trial at a time, so the trial's next rung always finds its state where it left it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass

from chimera.config import ChimeraConfig
from search.refine import TrialReport
from trainers.candidate import BudgetKind, Status, TrainBudget, budget_steps, train_candidate
from trainers.recipe import TrainHparams
from trainers.store import TokenStore

EVAL_WINDOWS = 128  # validation windows every trial is scored on, whatever its batch size


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one refinement shares."""

    config: ChimeraConfig
    hparams: TrainHparams  # the defaults that the proposed values replace
    store_dir: str
    tokens: int  # each trial's budget, split over ``rungs``
    rungs: int
    seed: int = 0
    threads: int = 1


def tuned(config: ChimeraConfig, hparams: TrainHparams, params: dict
          ) -> tuple[ChimeraConfig, TrainHparams]:
    """The config and hyperparameters with Optuna's values in place (dropout is the genome's).
    Evaluation always covers ``EVAL_WINDOWS`` windows, so trials of any batch size compare."""
    params = dict(params)
    if "dropout" in params:
        config = dataclasses.replace(config, dropout=params.pop("dropout"))
    hparams = dataclasses.replace(hparams, **params)
    hparams = dataclasses.replace(hparams, eval_batches=math.ceil(EVAL_WINDOWS
                                                                  / hparams.batch_size))
    return config, hparams


def train_trial_rung(spec: TrialSpec, store: TokenStore, params: dict, rung: int, state):
    """Train a trial from ``state`` to the end of ``rung``; (validation bpb, new state)."""
    config, hparams = tuned(spec.config, spec.hparams, params)
    total = budget_steps(TrainBudget(BudgetKind.TOKENS, spec.tokens), hparams)
    steps = max(1, round(total * rung / spec.rungs))
    result = train_candidate(config, store, TrainBudget(BudgetKind.STEPS, steps), hparams,
                             seed=spec.seed, resume=state, schedule_steps=total,
                             keep_state=True)
    if result.status is not Status.OK:
        raise RuntimeError(f"{result.status.value}: {result.error}")
    return result.val_bpb, result.state


class TrialActor:
    """A Ray actor's body: opens the store once, keeps its current trial's training state."""

    def __init__(self, spec: TrialSpec) -> None:
        import torch

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.store = TokenStore.open(spec.store_dir)
        self.states: dict[int, object] = {}

    def run(self, number: int, params: dict, rung: int) -> TrialReport:
        try:
            value, self.states[number] = train_trial_rung(self.spec, self.store, params, rung,
                                                          self.states.get(number))
            return TrialReport(number, rung, value)
        except Exception as err:  # noqa: BLE001 - reported as a failed trial
            self.states.pop(number, None)
            return TrialReport(number, rung, None, f"{type(err).__name__}: {err}")

    def drop(self, number: int) -> None:
        self.states.pop(number, None)


class RayTrials:
    """``search.refine.TrialRunner`` on ``parallel`` Ray actors of ``cpus`` CPUs each."""

    def __init__(self, spec: TrialSpec, parallel: int, cpus: float = 1.0,
                 gpus: float = 0.0) -> None:
        import ray

        actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(TrialActor)
        self.free = collections.deque(actor.remote(spec) for _ in range(parallel))
        self.owner: dict[int, object] = {}  # trial -> the actor holding its state
        self.params: dict[int, dict] = {}
        self.rung: dict[int, int] = {}
        self.in_flight: dict[object, int] = {}  # future -> trial

    def _submit(self, number: int) -> None:
        self.rung[number] += 1
        future = self.owner[number].run.remote(number, self.params[number], self.rung[number])
        self.in_flight[future] = number

    def start(self, number: int, params: dict) -> None:
        self.owner[number] = self.free.popleft()
        self.params[number], self.rung[number] = params, 0
        self._submit(number)

    def advance(self, number: int) -> None:
        self._submit(number)

    def stop(self, number: int) -> None:
        actor = self.owner.pop(number)
        actor.drop.remote(number)
        self.free.append(actor)
        del self.params[number], self.rung[number]

    def next_report(self) -> TrialReport:
        import ray

        done, _ = ray.wait(list(self.in_flight), num_returns=1)
        number = self.in_flight.pop(done[0])
        try:
            return ray.get(done[0])
        except ray.exceptions.RayError as err:  # the actor died: the trial fails
            return TrialReport(number, self.rung[number], None, f"worker lost: {err}")

    def shutdown(self) -> None:
        import ray

        for actor in list(self.free) + list(self.owner.values()):
            ray.kill(actor)
