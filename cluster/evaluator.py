"""The Ray actor-pool evaluator: one actor per worker slot, each training one candidate at a
time and reused across candidates. The search loop sees only the ``Evaluator`` interface."""

from __future__ import annotations

import ray

from cluster.worker import CandidateSettings, CandidateTrainer
from search.genome import Genome


class RayEvaluator:
    def __init__(self, settings: CandidateSettings, workers: int, cpus_per_candidate: float,
                 gpus_per_candidate: float = 0.0) -> None:
        self.slots = workers
        self.settings = settings
        self.actor_class = ray.remote(CandidateTrainer).options(
            num_cpus=cpus_per_candidate, num_gpus=gpus_per_candidate)
        self.names: dict[object, str] = {}
        self.free = [self._start(f"worker-{i}") for i in range(workers)]
        self.busy: dict[ray.ObjectRef, tuple[int, object]] = {}  # ref -> (candidate, actor)

    def _start(self, name: str):
        actor = self.actor_class.remote(self.settings, name)
        self.names[actor] = name
        return actor

    def submit(self, candidate_id: int, genome: Genome) -> None:
        actor = self.free.pop(0)
        ref = actor.train.options(name=f"candidate-{candidate_id}").remote(genome.to_dict())
        self.busy[ref] = (candidate_id, actor)

    def next_result(self, timeout: float | None) -> tuple[int, dict] | None:
        if not self.busy:
            return None
        ready, _ = ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        candidate_id, actor = self.busy.pop(ref)
        try:
            result = ray.get(ref)
            self.free.append(actor)
        except ray.exceptions.RayError as err:  # the worker died: replace it, record the loss
            result = {"status": "failed", "error": f"worker lost: {type(err).__name__}: {err}"}
            self._replace(actor)
        return candidate_id, result

    def _replace(self, dead) -> None:
        """A worker died: start a fresh one in its slot (retrying the candidate on it is the
        cluster-scale issue's work; here the candidate is recorded failed)."""
        name = self.names.pop(dead)
        ray.kill(dead, no_restart=True)
        self.free.append(self._start(name))

    def in_flight(self) -> int:
        return len(self.busy)

    def running(self) -> dict[int, str]:
        return {cid: self.names[actor] for cid, actor in self.busy.values()}

    def cancel_all(self) -> list[int]:
        cancelled = [cid for cid, _ in self.busy.values()]
        for _, actor in self.busy.values():  # a training step cannot be interrupted politely
            self.names.pop(actor, None)
            ray.kill(actor, no_restart=True)
        self.busy.clear()
        return cancelled

    def close(self) -> None:
        for actor in list(self.names):
            ray.kill(actor, no_restart=True)
        self.names.clear()
