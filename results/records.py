"""Rows of the run database decoded once, into types: ``CandidateRecord`` (a row of
``candidates``) and ``RungRecord`` (a row of ``rungs``, with hurdles).

The database stores the genome, the lineage and the full result as JSON text and the status as
a string; a record holds them as a dict, a tuple of ids, a dict and a ``Status``. A row of a
database made by an earlier version, which lacks some columns, decodes with None for them.
What crosses the Ray boundary (a worker's result) stays a plain dict; records are for what
reads a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from trainers.candidate import Status


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate: its genome and lineage, status, metrics, full result, timings and worker.
    The fields are the ``candidates`` columns, in the table's order."""

    id: int
    genome_key: str
    genome: dict[str, Any]
    summary: str
    parents: tuple[int, ...]
    operator: str  # seed | random | mutation | crossover
    generation: int
    status: Status
    attempts: int | None = None  # runs it took: more than 1 when a worker was lost
    reused_from: int | None = None  # the candidate whose result (same genome) it reuses
    # metrics (None until it finished, or where a result lacks them)
    val_loss: float | None = None
    val_bpb: float | None = None
    params: int | None = None
    non_embedding_params: int | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    wall_seconds: float | None = None
    peak_memory_mb: float | None = None
    train_flops: float | None = None
    result: dict[str, Any] | None = None  # the full result (loss curve included)
    error: str | None = None
    worker: str | None = None
    # timings, unix seconds
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CandidateRecord:
        """Decode a row of ``candidates`` (a mapping of column names); a column the row lacks
        (a database from an earlier version) decodes as None."""
        values = {f.name: row.get(f.name) for f in fields(cls)}
        values.update(genome=json.loads(row["genome"]), parents=tuple(json.loads(row["parents"])),
                      status=Status(row["status"]), result=_json(row.get("result")))
        return cls(**values)

    @property
    def rung(self) -> int:
        """The furthest hurdle rung it reached (0 without hurdles, or before a result)."""
        return (self.result or {}).get("rung", 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the row with the genome, parents and result decoded."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(status=self.status.value, parents=list(self.parents))
        return data


@dataclass(frozen=True)
class RungRecord:
    """One hurdle rung a candidate finished (its final rung is also the candidate's result)."""

    candidate_id: int
    rung: int
    status: Status
    steps: int | None = None
    tokens: int | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    wall_seconds: float | None = None
    result: dict[str, Any] | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RungRecord:
        values = {f.name: row.get(f.name) for f in fields(cls)}
        values.update(status=Status(row["status"]), result=_json(row.get("result")))
        return cls(**values)

    @property
    def train_flops(self) -> float:
        """Training FLOPs of the candidate up to the end of this rung (0 where not recorded)."""
        return (self.result or {}).get("train_flops") or 0.0


def as_records(rows: Iterable[CandidateRecord | Mapping[str, Any]]) -> list[CandidateRecord]:
    """Records as they are, raw rows (``RunDatabase.candidates()`` and the like) decoded."""
    return [row if isinstance(row, CandidateRecord) else CandidateRecord.from_row(row)
            for row in rows]
