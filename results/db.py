"""The run database: one SQLite file per run holding the run's configuration and every
candidate (genome, lineage, budget, metrics, status, worker, timings).

Every write is its own transaction and the journal is write-ahead (WAL): a process killed at any
moment loses no completed result, and other processes (``chimera leaderboard``) can read while a
search writes. It deals in plain data only; it knows nothing of genomes or Ray.

Inspect with any SQLite tool: ``sqlite3 runs/NAME/results.db 'select * from candidates'``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,            -- birth order
    genome_key TEXT NOT NULL,
    genome TEXT NOT NULL,              -- JSON
    summary TEXT NOT NULL,
    parents TEXT NOT NULL,             -- JSON list of candidate ids
    operator TEXT NOT NULL,            -- seed | random | mutation | crossover
    generation INTEGER NOT NULL,
    status TEXT NOT NULL,              -- pending | running | ok | diverged | out_of_memory |
                                       -- failed | cancelled
    reused_from INTEGER,               -- set when the genome's earlier result was reused
    val_loss REAL, val_bpb REAL, params INTEGER, non_embedding_params INTEGER,
    tokens INTEGER, tokens_per_second REAL, wall_seconds REAL, peak_memory_mb REAL,
    result TEXT,                       -- the full result as JSON (loss curve included)
    error TEXT, worker TEXT,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL
);
CREATE INDEX IF NOT EXISTS candidates_by_genome ON candidates (genome_key);
"""

FINISHED = ("ok", "diverged", "out_of_memory", "failed")
UNFINISHED = ("pending", "running", "cancelled")
METRIC_COLUMNS = ("val_loss", "val_bpb", "params", "non_embedding_params", "tokens",
                  "tokens_per_second", "wall_seconds", "peak_memory_mb")


class RunDatabase:
    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no run database")
            uri = f"file:{self.path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable commits
            self.conn.executescript(SCHEMA)
        self.conn.row_factory = sqlite3.Row
        self.lock = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self.lock, self.conn:  # one transaction per write
            return self.conn.execute(sql, params)

    def _rows(self, sql: str, params: tuple = ()) -> list[dict]:
        with self.lock:
            return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    # ------------------------------------------------------------------ run configuration
    def set_config(self, config: dict) -> None:
        self._write("INSERT OR REPLACE INTO run (key, value) VALUES ('config', ?)",
                    (json.dumps(config, sort_keys=True),))

    def config(self) -> dict | None:
        rows = self._rows("SELECT value FROM run WHERE key = 'config'")
        return json.loads(rows[0]["value"]) if rows else None

    # ------------------------------------------------------------------ the Recorder protocol
    def lookup(self, genome_key: str) -> tuple[int, dict] | None:
        rows = self._rows(
            f"SELECT id, result FROM candidates WHERE genome_key = ? AND reused_from IS NULL "
            f"AND status IN {FINISHED} ORDER BY id LIMIT 1", (genome_key,))
        return (rows[0]["id"], json.loads(rows[0]["result"])) if rows else None

    def record_proposal(self, proposal: dict) -> int:
        cursor = self._write(
            "INSERT INTO candidates (genome_key, genome, summary, parents, operator, generation, "
            "status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            (proposal["genome_key"], json.dumps(proposal["genome"], sort_keys=True),
             proposal["summary"], json.dumps(proposal["parents"]), proposal["operator"],
             proposal["generation"], time.time()))
        return cursor.lastrowid

    def record_start(self, candidate_id: int, worker: str) -> None:
        self._write("UPDATE candidates SET status = 'running', worker = ?, started_at = ?, "
                    "error = NULL WHERE id = ?", (worker, time.time(), candidate_id))

    def record_result(self, candidate_id: int, result: dict) -> None:
        self._write(
            f"UPDATE candidates SET status = ?, {', '.join(f'{c} = ?' for c in METRIC_COLUMNS)},"
            f" result = ?, error = ?, finished_at = ? WHERE id = ?",
            (result["status"], *(result.get(c) for c in METRIC_COLUMNS), json.dumps(result),
             result.get("error"), time.time(), candidate_id))

    def record_reused(self, proposal: dict, source_id: int, result: dict) -> int:
        candidate_id = self.record_proposal(proposal)
        self.record_result(candidate_id, result)
        self._write("UPDATE candidates SET reused_from = ?, worker = 'reused' WHERE id = ?",
                    (source_id, candidate_id))
        return candidate_id

    def record_cancelled(self, candidate_id: int, reason: str) -> None:
        self._write("UPDATE candidates SET status = 'cancelled', error = ?, finished_at = ? "
                    "WHERE id = ?", (reason, time.time(), candidate_id))

    # ------------------------------------------------------------------ queries
    def candidates(self) -> list[dict]:
        return self._rows("SELECT * FROM candidates ORDER BY id")

    def finished_in_order(self) -> list[dict]:
        """Finished candidates (trained or reused) in birth order: a search's history."""
        return self._rows(f"SELECT * FROM candidates WHERE status IN {FINISHED} ORDER BY id")

    def unfinished(self) -> list[dict]:
        """Candidates an interrupted search still owes: pending, running or cancelled."""
        return self._rows(f"SELECT * FROM candidates WHERE status IN {UNFINISHED} ORDER BY id")

    def leaderboard(self, top: int | None = None) -> list[dict]:
        """Trained candidates that finished ok, best validation bits per byte first."""
        limit = "" if top is None else f" LIMIT {int(top)}"
        return self._rows("SELECT * FROM candidates WHERE status = 'ok' AND reused_from IS NULL "
                          "ORDER BY val_bpb, id" + limit)

    def counts(self) -> dict[str, int]:
        rows = self._rows("SELECT status, COUNT(*) AS n FROM candidates "
                          "WHERE reused_from IS NULL GROUP BY status")
        counts = {row["status"]: row["n"] for row in rows}
        counts["reused"] = self._rows("SELECT COUNT(*) AS n FROM candidates "
                                      "WHERE reused_from IS NOT NULL")[0]["n"]
        return counts
