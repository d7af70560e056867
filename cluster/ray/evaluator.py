"""The Ray actor-pool evaluator: a pool of ``CandidateTrainer`` actors spread over the cluster's
nodes, each training one candidate at a time and reused across candidates. The search loop sees
only the ``Evaluator`` interface.

Faults, and what happens to the candidate that was training:

- the actor dies or its node is lost (Ray reports the actor dead or unavailable): the actor is
  replaced and the candidate retried on the next free worker;
- the actor hangs: a busy actor is asked for a heartbeat every ``heartbeat_seconds``; no answer,
  or an answer saying training made no progress, for ``hang_seconds`` marks it hung; it is
  killed and replaced and the candidate retried;
- retries are bounded (``max_attempts`` runs in all); after the last one the candidate is
  reported failed with every attempt's error. Results carry ``attempts`` and ``retries`` (the
  errors of the attempts that were lost), so every candidate is accounted for.

A candidate that raises inside ``train`` (not a fault of the worker) is reported failed at once:
it would fail again. A worker that cannot be scheduled (its node is gone and nothing else has
room) is given up after ``start_seconds`` and the pool shrinks; queued candidates wait for the
workers that remain.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import ray

from cluster.ray.node_store import StoreSource
from cluster.ray.worker import CandidateSettings, CandidateTrainer, FaultPolicy, memory_rejection
from search.genome import Genome

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    name: str
    actor: object
    created: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    heartbeat_ref: object = None
    heartbeat_sent: float = 0.0


@dataclass
class _Job:
    candidate_id: int
    genome: Genome
    rung: int = 0
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = 0.0


class RayEvaluator:
    def __init__(self, settings: CandidateSettings, workers: int, cpus_per_candidate: float,
                 gpus_per_candidate: float = 0.0, store: StoreSource | None = None,
                 faults: FaultPolicy = FaultPolicy(), name_prefix: str | None = None) -> None:
        """``store``: how workers reach the token store (None: ``settings.store_dir`` in place).
        ``name_prefix``: of the actors' names, as the dashboard shows them."""
        self.settings, self.faults, self.store = settings, faults, store
        self.prefix = name_prefix if name_prefix is not None else f"chimera-{uuid.uuid4().hex[:6]}-"
        self.cpus, self.gpus = cpus_per_candidate, gpus_per_candidate
        # Two threads per actor: one trains, one answers heartbeats. SPREAD puts the pool across
        # nodes, so losing one node loses as few candidates as possible.
        self.actor_class = ray.remote(CandidateTrainer)
        self.actor_options = dict(num_cpus=cpus_per_candidate, num_gpus=gpus_per_candidate,
                                  max_concurrency=2, max_restarts=0, scheduling_strategy="SPREAD")
        self.workers: dict[str, _Worker] = {}
        self.free: list[_Worker] = []
        self.queue: list[_Job] = []  # waiting for a worker; retries go first
        self.refs: dict[object, tuple[str, _Worker, _Job | None]] = {}  # kind, worker, job
        self.busy: dict[str, tuple[object, _Job]] = {}  # worker name -> (train ref, job)
        self.finished: list[tuple[int, dict]] = []  # results decided without a train call
        self.replacements = itertools.count(1)
        self.start_error: str | None = None
        self.start_failures = 0
        for i in range(workers):
            self._start(f"{self.prefix}worker-{i}")
        self.memory_limit = self._node_memory()

    @property
    def slots(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------------ pool
    def _start(self, name: str) -> None:
        actor = self.actor_class.options(name=name, **self.actor_options).remote(
            self.settings, name, self.store)
        worker = _Worker(name, actor, time.monotonic())
        self.workers[name] = worker
        self.refs[actor.describe.remote()] = ("ready", worker, None)

    def _forget(self, worker: _Worker) -> None:
        self.workers.pop(worker.name, None)
        if worker in self.free:
            self.free.remove(worker)
        self.busy.pop(worker.name, None)
        for ref in [ref for ref, (_, w, _) in self.refs.items() if w is worker]:
            del self.refs[ref]
        ray.kill(worker.actor, no_restart=True)

    def _replace(self, worker: _Worker) -> None:
        self._forget(worker)
        base = worker.name.rsplit(".", 1)[0] if "." in worker.name else worker.name
        self._start(f"{base}.{next(self.replacements)}")  # names are never reused

    def _node_memory(self) -> int:
        """The most memory one node offers a candidate (Ray's ``memory`` resource)."""
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        fits = [r.get("memory", 0) for r in nodes
                if r.get("CPU", 0) >= self.cpus and r.get("GPU", 0) >= self.gpus]
        return int(max(fits, default=0))

    def rejection(self, genome: Genome) -> str | None:
        device_memory = [w.info["device_memory"] for w in self.workers.values()
                         if "device_memory" in w.info]
        if device_memory:  # a fractional GPU gets its share of the device's memory
            share = max(device_memory) * min(1.0, self.gpus or 1.0)
            return memory_rejection(genome, self.settings, int(share), "a worker's GPU share")
        if not self.memory_limit:
            return None
        return memory_rejection(genome, self.settings, self.memory_limit, "the largest node")

    # ------------------------------------------------------------------ the Evaluator protocol
    def submit(self, candidate_id: int, genome: Genome, rung: int = 0) -> None:
        self.queue.append(_Job(candidate_id, genome, rung))
        self._dispatch()

    def release(self, candidate_id: int) -> None:
        """The candidate will not continue: drop its checkpoint (hurdles)."""
        if self.settings.rung_steps:
            self.settings.checkpoint_path(candidate_id).unlink(missing_ok=True)

    def _dispatch(self) -> None:
        if self.start_error and not self.workers:
            for job in self.queue:  # nothing will ever run them
                self._fail(job, f"no worker could start: {self.start_error}")
            self.queue.clear()
        while self.queue and self.free:
            job, worker = self.queue.pop(0), self.free.pop(0)
            job.attempts += 1
            job.started = time.monotonic()
            suffix = (f"-rung-{job.rung}" if job.rung else "") + \
                (f"-attempt-{job.attempts}" if job.attempts > 1 else "")
            ref = worker.actor.train.options(name=f"candidate-{job.candidate_id}{suffix}") \
                .remote(job.genome.to_dict(), job.candidate_id, job.rung)
            self.refs[ref] = ("train", worker, job)
            self.busy[worker.name] = (ref, job)
            worker.heartbeat_ref, worker.heartbeat_sent = None, time.monotonic()

    def next_result(self, timeout: float | None) -> tuple[int, dict] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            self._check_workers()
            if self.finished:
                return self.finished.pop(0)
            if not self.busy and not self.queue:
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            wait = self.faults.heartbeat_seconds / 2
            wait = wait if remaining is None else min(wait, remaining)
            if not self.refs:  # queued work, no worker yet: let start-up time pass
                time.sleep(wait)
                continue
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=wait)
            for ref in ready:
                result = self._handle(ref)
                if result is not None:
                    return result

    def wait_until_started(self, timeout: float) -> int:
        """Wait until every worker of the pool has started (or ``timeout``); how many have."""
        deadline = time.monotonic() + timeout
        while True:
            starting = [ref for ref, (kind, _, _) in self.refs.items() if kind == "ready"]
            remaining = deadline - time.monotonic()
            if not starting or remaining <= 0:
                return sum(worker.ready for worker in self.workers.values())
            ready, _ = ray.wait(starting, num_returns=1, timeout=remaining)
            for ref in ready:
                self._handle(ref)

    def _handle(self, ref) -> tuple[int, dict] | None:
        kind, worker, job = self.refs.pop(ref)
        if kind == "heartbeat":
            worker.heartbeat_ref = None
            try:
                since_progress = ray.get(ref)
            except ray.exceptions.RayError:
                return None  # the train call reports the death
            if since_progress is not None and since_progress > self.faults.hang_seconds:
                self._lost(worker, f"worker hung: no training progress for "
                                   f"{since_progress:.0f}s")
            return None
        if kind == "ready":
            try:
                worker.info = ray.get(ref)
            except ray.exceptions.RayError as err:
                self._start_failed(worker, err)
                return None
            worker.ready = True
            self.start_failures = 0
            self.free.append(worker)
            log.info("%s started on node %s (store: %s)", worker.name,
                     worker.info.get("node_id", "")[:12], worker.info.get("store_origin"))
            return None
        self.busy.pop(worker.name, None)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the worker or its node died
            self._lost(worker, f"worker lost: {type(err).__name__}: {_first_line(err)}", job)
            return self.finished.pop(0) if self.finished else None
        except ray.exceptions.RayError as err:  # train itself raised: it would again
            self.free.append(worker)
            return job.candidate_id, self._with_attempts(
                {"status": "failed", "error": f"{type(err).__name__}: {err}",
                 "worker": worker.name}, job)
        self.free.append(worker)
        return job.candidate_id, self._with_attempts(result, job)

    def _start_failed(self, worker: _Worker, err: Exception) -> None:
        self.start_failures += 1
        self.start_error = f"{type(err).__name__}: {_first_line(err)}"
        log.warning("%s failed to start: %s", worker.name, self.start_error)
        if self.start_failures < self.faults.max_attempts:
            self._replace(worker)
        else:  # it keeps failing: stop starting workers; the pool shrinks
            self._forget(worker)

    def _check_workers(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if not worker.ready:
                if now - worker.created > self.faults.start_seconds:
                    log.warning("%s did not start within %.0fs; giving it up", worker.name,
                                self.faults.start_seconds)
                    self.start_error = f"{worker.name} was not scheduled within " \
                                       f"{self.faults.start_seconds:.0f}s"
                    self._forget(worker)
                continue
            if worker.name not in self.busy:
                continue
            if worker.heartbeat_ref is None:
                if now - worker.heartbeat_sent >= self.faults.heartbeat_seconds:
                    worker.heartbeat_ref, worker.heartbeat_sent = \
                        worker.actor.heartbeat.remote(), now
                    self.refs[worker.heartbeat_ref] = ("heartbeat", worker, None)
            elif now - worker.heartbeat_sent > self.faults.hang_seconds:
                self._lost(worker, f"worker hung: no heartbeat for "
                                   f"{now - worker.heartbeat_sent:.0f}s")

    def _lost(self, worker: _Worker, error: str, job: _Job | None = None) -> None:
        """A worker died or hung mid-candidate: replace it; retry the candidate or give up."""
        job = job or self.busy.get(worker.name, (None, None))[1]
        log.warning("%s: %s", worker.name, error)
        self._replace(worker)
        if job is None:
            return
        job.errors.append(f"attempt {job.attempts} on {worker.name}: {error}")
        if job.attempts < self.faults.max_attempts:
            self.queue.insert(0, job)
        else:
            self._fail(job, f"gave up after {job.attempts} attempts")

    def _fail(self, job: _Job, error: str) -> None:
        detail = "; ".join(job.errors)
        self.finished.append((job.candidate_id, self._with_attempts(
            {"status": "failed", "error": f"{error}: {detail}" if detail else error}, job)))

    @staticmethod
    def _with_attempts(result: dict, job: _Job) -> dict:
        return {**result, "attempts": max(1, job.attempts), "retries": list(job.errors)}

    def in_flight(self) -> int:
        return len(self.busy) + len(self.queue) + len(self.finished)

    def running(self) -> dict[int, str]:
        waiting = {job.candidate_id: f"waiting for a worker (attempt {job.attempts + 1})"
                   for job in self.queue}
        return waiting | {job.candidate_id: self.workers[name].info.get("name", name)
                          for name, (_, job) in self.busy.items()}

    def worker_of(self, candidate_id: int):
        """The actor training ``candidate_id`` now, or None (for operators and tests)."""
        for name, (_, job) in self.busy.items():
            if job.candidate_id == candidate_id:
                return self.workers[name].actor
        return None

    def cancel_all(self) -> list[int]:
        cancelled = [job.candidate_id for _, job in self.busy.values()]
        cancelled += [job.candidate_id for job in self.queue]
        cancelled += [candidate_id for candidate_id, _ in self.finished]  # not yet reported
        self.queue.clear()
        self.finished.clear()
        for name in list(self.busy):  # a training step cannot be interrupted politely
            self._forget(self.workers[name])
        return cancelled

    def close(self) -> None:
        for worker in list(self.workers.values()):
            self._forget(worker)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""
