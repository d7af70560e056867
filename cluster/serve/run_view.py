"""What ``chimera dashboard`` shows of a search run, as JSON-ready data; no HTTP here.

A run database is written by its search while this reads it, from another process: it is
opened read-only (``RunDatabase(target, readonly=True)``) and every query is its own short
read transaction on a pooled connection, so with SQLite's write-ahead journal a reader never
blocks the writer and never holds back its checkpoints between requests.

Reading every candidate is the costly part, so the run is read into a ``Snapshot`` only when it
has changed, and a snapshot builds each payload once for every page that polls it. Whether the
run has changed is answered by a few small queries (``RunView._changes``), asked at most once
per ``REFRESH_SECONDS``. A candidate's full result (its loss curve: most of the bytes, and most
of the decoding time) is decoded only when that candidate's page asks for it; rung rows, which
never change once written, are decoded once.

Each payload is JSON text (UTF-8 bytes), a number that is not finite (a diverged loss) as null:

    run()            the settings, counts by status, budget and time, the best candidate
    candidates()     every candidate (a leaderboard row each), the best-so-far series
    candidate(id)    one candidate: genome, parents and what changed, rungs, loss curve, timings
    lineage(id)      a candidate and its ancestors, up to the roots
    promoted()       RUN/promoted's metrics.json and report.md, once ``chimera promote`` ran
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from results.db import RunDatabase, RunDatabaseError
from results.leaderboard import origin
from results.plots import ancestors, compute_and_scores, fully_trained
from results.records import CandidateRecord, RungRecord
from search.genome import Genome, genome_changes
from trainers.candidate import BudgetKind, Status, TrainBudget

# How stale a page may see the run: the change check runs at most this often, however many
# pages poll (each polls every 2 s).
REFRESH_SECONDS = 1.0
# A full read at least this often, whatever the change check says: a backstop, should a write
# ever change nothing the check looks at.
MAX_AGE_SECONDS = 30.0
REPORT_MAX_BYTES = 1_000_000  # report.md is a few kB; a page need not show more than this


class NotFound(LookupError):
    """No such candidate, or no promoted model: a 404."""


def _rung_row(rung: RungRecord) -> dict:
    return {"rung": rung.rung, "status": rung.status.value, "steps": rung.steps,
            "tokens": rung.tokens, "val_loss": rung.val_loss, "val_bpb": rung.val_bpb,
            "wall_seconds": rung.wall_seconds, "finished_at": rung.finished_at}


@dataclass
class Snapshot:
    """The run as read at ``taken_at``: every record, its rungs, the counts and settings."""

    taken_at: float
    records: list[CandidateRecord]  # without their result: see ``row``
    rungs: list[RungRecord]
    counts: dict[str, int]
    config: dict
    flops_spent: float | None  # None unless the run has a FLOPs budget
    rows: dict[int, dict]  # the raw rows by id, their result still JSON text
    by_id: dict[int, CandidateRecord] = field(init=False)
    rungs_of: dict[int, list[RungRecord]] = field(init=False)
    children_of: dict[int, list[int]] = field(init=False)
    built: dict[str, object] = field(default_factory=dict, init=False)  # payloads, once each
    _building: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {record.id: record for record in self.records}
        self.rungs_of, self.children_of = {}, {}
        for rung in self.rungs:
            self.rungs_of.setdefault(rung.candidate_id, []).append(rung)
        for record in self.records:
            for parent in record.parents:
                self.children_of.setdefault(parent, []).append(record.id)

    def record(self, candidate_id: int) -> CandidateRecord:
        """The candidate with its full result."""
        return _decoded(self.rows[candidate_id])

    def rung_reached(self, record: CandidateRecord) -> int:
        """The furthest hurdle rung it reached (a reused candidate: its source's)."""
        rungs = self.rungs_of.get(record.reused_from or record.id, [])
        return max((rung.rung for rung in rungs), default=0)

    def once(self, name: str, build):
        """``build()``, by the first request that asks (the others wait for it)."""
        with self._building:
            if name not in self.built:
                self.built[name] = build()
            return self.built[name]


class RunView:
    """The dashboard's reads of one run. Thread-safe: requests run in a thread pool, and those
    that arrive while the run is read wait for that one read rather than start their own."""

    def __init__(self, db: RunDatabase, name: str, promoted_dir: Path | None = None,
                 serve_hint: str = "") -> None:
        self.db, self.name, self.promoted_dir = db, name, promoted_dir
        self.serve_hint = serve_hint  # the command that serves the promoted model
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._fingerprint: tuple | None = None
        self._checked_at = 0.0
        # What changed from each candidate's first parent: a genome and its parents never
        # change once proposed, so this is worked out once per candidate, not once per read.
        self._origins: dict[int, str] = {}
        self._rungs: dict[tuple, RungRecord] = {}  # decoded rung rows, which never change
        self._records: dict[int, tuple[tuple, CandidateRecord]] = {}  # by id: as last read

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ reading the run
    def snapshot(self) -> Snapshot:
        """The run, read again if it has changed since the last read."""
        with self._lock:
            now = time.monotonic()
            snap = self._snapshot
            if snap is not None and now - self._checked_at < REFRESH_SECONDS:
                return snap
            self._checked_at = now
            fingerprint = self._changes()
            if snap is None or fingerprint != self._fingerprint \
                    or time.time() - snap.taken_at > MAX_AGE_SECONDS:
                snap = self._read()
                self._snapshot, self._fingerprint = snap, fingerprint
            return snap

    def _changes(self) -> tuple:
        """What a write to the run changes, in a few small queries: every status change moves
        the counts (a proposal, a start, a result, a reuse, a cancellation); a worker lost and
        its candidate retried changes the running rows; a rung finished adds a rung row to a
        running candidate; a resumed session writes its settings."""
        running = self.db.running_records()
        return (tuple(sorted(self.db.counts().items())),
                tuple((r.id, r.worker, r.started_at, r.attempts) for r in running),
                tuple((r.candidate_id, r.rung, r.finished_at) for c in running
                      for r in self.db.rung_records(c.id)),
                json.dumps(self.db.config(), sort_keys=True))

    def _read(self) -> Snapshot:
        # The candidates before their rungs (each query sees the run as it is then): the search
        # records a candidate's last rung before its result, so a candidate read as finished
        # has all its rungs in the later read; the other order could miss them.
        rows = self.db.candidates()
        rungs = [self._rung(row) for row in self.db.rungs()]
        config = self.db.config() or {}
        # (Its own query decodes every rung's result: only for a run that has such a budget.)
        flops = self.db.train_flops_spent() if (config.get("limits") or {}).get(
            "train_flops") else None
        return Snapshot(time.time(), [self._record(row) for row in rows], rungs,
                        self.db.counts(), config, flops, {row["id"]: row for row in rows})

    def _record(self, row: dict) -> CandidateRecord:
        """A row decoded without its result, again only when its state has changed (a start, a
        result, a retry, a cancellation, a reuse: each moves one of these columns)."""
        state = tuple(row[c] for c in ("status", "worker", "attempts", "reused_from",
                                        "started_at", "finished_at", "error"))
        known = self._records.get(row["id"])
        if known is None or known[0] != state:
            known = self._records[row["id"]] = (state, _decoded({**row, "result": None}))
        return known[1]

    def _rung(self, row: dict) -> RungRecord:
        key = (row["candidate_id"], row["rung"], row["finished_at"])  # a retried rung: new time
        if key not in self._rungs:
            self._rungs[key] = _decoded(row, RungRecord)
        return self._rungs[key]

    def _origin(self, record: CandidateRecord, snap: Snapshot) -> str:
        if record.id not in self._origins:
            parents = {p: snap.by_id[p].genome for p in record.parents[:1] if p in snap.by_id}
            self._origins[record.id] = origin(record, parents)
        return self._origins[record.id]

    # ------------------------------------------------------------------ payloads
    def run(self) -> bytes:
        snap = self.snapshot()
        run = snap.once("run", lambda: self._run(snap))
        # Asked each time, as nothing in the database changes with them: the clock of a run
        # still running, and a promoted model (a finished search's snapshot is not read again).
        first, last = run["first_event_at"], run["last_event_at"]
        elapsed = None if first is None else (time.time() if run["running"] else last) - first
        promoted = self.promoted_dir is not None and self.promoted_dir.is_dir()
        return to_json({**run, "elapsed_seconds": elapsed, "promoted": promoted})

    def _run(self, snap: Snapshot) -> dict:
        leaders = fully_trained(snap.records, snap.rungs)
        best = min(leaders, key=lambda r: (r.val_bpb, r.id), default=None)
        stamps = [t for r in snap.records for t in (r.created_at, r.started_at, r.finished_at)
                  if t is not None]
        limits = snap.config.get("limits") or {}
        return {
            "name": self.name, "updated_at": snap.taken_at, "settings": _settings(snap.config),
            "counts": snap.counts, "candidates": len(snap.records),
            "running": snap.counts.get(Status.RUNNING.value, 0) > 0,
            "best": None if best is None else {"id": best.id, "summary": best.summary,
                                               "val_bpb": best.val_bpb, "params": best.params},
            "budget": {"wall_seconds": limits.get("wall_seconds"),
                       "max_candidates": limits.get("max_candidates"),
                       "max_generations": limits.get("max_generations"),
                       "train_flops": limits.get("train_flops"),
                       "train_flops_spent": snap.flops_spent},
            # elapsed: from the first proposal to now while it runs, else to the last event
            "first_event_at": min(stamps, default=None), "last_event_at": max(stamps, default=None),
        }

    def candidates(self) -> bytes:
        snap = self.snapshot()
        return snap.once("candidates", lambda: to_json(self._candidates(snap)))

    def _candidates(self, snap: Snapshot) -> dict:
        comparable = {r.id for r in fully_trained(snap.records, snap.rungs)}
        rows = [self._row(record, snap, record.id in comparable) for record in snap.records]
        # After each result in the order results finished: [results so far, worker-hours,
        # training FLOPs, its bpb or null]; with hurdles each rung is a result.
        hours = compute_and_scores(snap.records, snap.rungs)
        flops = compute_and_scores(snap.records, snap.rungs, flops=True)
        progress = [[n, spent / 3600.0, f, bpb]
                    for n, ((spent, bpb), (f, _)) in enumerate(zip(hours, flops), start=1)]
        return {"updated_at": snap.taken_at, "candidates": rows, "progress": progress}

    def _row(self, record: CandidateRecord, snap: Snapshot, comparable: bool) -> dict:
        """A leaderboard row: no genome, result or loss curve (``candidate(id)`` has them)."""
        return {
            "id": record.id, "status": record.status.value, "summary": record.summary,
            "operator": record.operator, "generation": record.generation,
            "parents": list(record.parents), "origin": self._origin(record, snap),
            "reused_from": record.reused_from, "val_bpb": record.val_bpb,
            "val_loss": record.val_loss, "params": record.params, "tokens": record.tokens,
            "tokens_per_second": record.tokens_per_second,
            "wall_seconds": record.wall_seconds, "train_flops": record.train_flops,
            "worker": record.worker, "started_at": record.started_at,
            "finished_at": record.finished_at, "rung": snap.rung_reached(record),
            "rungs": [_rung_row(r) for r in snap.rungs_of.get(record.id, [])],
            # trained to the full budget (with hurdles, past the last rung): its bpb ranks
            "comparable": comparable,
        }

    def candidate(self, candidate_id: int) -> bytes:
        snap = self.snapshot()
        if candidate_id not in snap.by_id:
            raise NotFound(f"no candidate {candidate_id} in {self.name}")
        record = snap.record(candidate_id)
        data = record.to_dict()
        result = data.pop("result") or {}
        genome = Genome.from_dict(record.genome)
        parents = []
        for parent_id in record.parents:
            parent = snap.by_id.get(parent_id)
            parents.append({"id": parent_id} if parent is None else {
                "id": parent_id, "summary": parent.summary, "val_bpb": parent.val_bpb,
                "status": parent.status.value,
                "changes": genome_changes(Genome.from_dict(parent.genome), genome)})
        created, started, finished = record.created_at, record.started_at, record.finished_at
        return to_json({**data, "origin": self._origin(record, snap), "parents": parents,
                "children": snap.children_of.get(candidate_id, []),
                "rungs": [_rung_row(r) for r in snap.rungs_of.get(candidate_id, [])],
                "loss_curve": result.get("loss_curve", []), "steps": result.get("steps"),
                "timings": {"queued_seconds": _gap(created, started),
                            "running_seconds": _gap(started, finished or (
                                time.time() if record.status is Status.RUNNING else None)),
                            "training_seconds": record.wall_seconds},
                "updated_at": snap.taken_at})

    def lineage(self, candidate_id: int) -> bytes:
        snap = self.snapshot()
        if candidate_id not in snap.by_id:
            raise NotFound(f"no candidate {candidate_id} in {self.name}")
        family = ancestors(snap.records, candidate_id)
        return to_json({"id": candidate_id, "updated_at": snap.taken_at,
                "nodes": [{"id": r.id, "parents": list(r.parents), "operator": r.operator,
                           "generation": r.generation, "summary": r.summary,
                           "status": r.status.value, "val_bpb": r.val_bpb,
                           "origin": self._origin(r, snap)}
                          for r in sorted(family.values(), key=lambda r: r.id)]})

    def promoted(self) -> bytes:
        folder = self.promoted_dir
        if folder is None or not folder.is_dir():
            raise NotFound(f"{self.name} has no promoted model yet (chimera promote makes one)")
        metrics, report = None, None
        try:
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet (promote still running), or partial
            pass
        try:
            with open(folder / "report.md", encoding="utf-8", errors="replace") as f:
                report = f.read(REPORT_MAX_BYTES)
        except OSError:
            pass
        return to_json({"metrics": metrics, "report": report, "serve": self.serve_hint})


def _finite(value):
    """``value`` with every float that is not finite as None: JSON has no NaN or Infinity (a
    browser's JSON.parse refuses them), and a diverged loss curve holds them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def to_json(data) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity somewhere (rarely): the slower, cleaning way
        return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False).encode()


def _decoded(row: dict, kind=CandidateRecord):
    """A row decoded, or a ``RunDatabaseError`` naming the candidate (as the database's own
    ``*_records`` queries do)."""
    try:
        return kind.from_row(row)
    except (ValueError, TypeError) as err:  # bad JSON, an unknown status
        which = row.get("id", row.get("candidate_id"))
        raise RunDatabaseError(f"candidate {which} cannot be read ({type(err).__name__}: "
                               f"{err})") from None


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


def _settings(config: dict) -> dict:
    """The run's settings worth a glance, from the configuration the search stored in the
    database (``EvolveSettings.to_dict()``): a resumed session rewrites it with its limits.
    Read with ``get``: a run made by an earlier version may lack some of them. (Not its
    database URL, which may hold a password, nor local paths.)"""
    budget = config.get("candidate_budget")
    return {
        "space": config.get("space"), "strategy": config.get("strategy"),
        "objectives": config.get("objectives"),
        "population": (config.get("evolution") or {}).get("population_size"),
        "candidate_budget": TrainBudget(BudgetKind(budget["kind"]), budget["amount"]).describe()
        if budget else None,
        "hurdles": config.get("hurdles"), "max_params": config.get("max_params"),
        "workers": config.get("workers"), "in_process": config.get("in_process"),
        "corpus": (config.get("corpus") or {}).get("source"),
        "tokenizer": config.get("tokenizer"), "vocab_size": config.get("vocab_size"),
        "seed": config.get("seed"), "limits": config.get("limits"),
    }
