"""The run database: the run's configuration and every candidate (genome, lineage, budget,
metrics, status, worker, timings).

By default one SQLite file per run (``runs/NAME/results.db``); any SQLAlchemy URL (e.g.
``postgresql://user@host/chimera``) puts it on a database server instead. Every write is its own
transaction; SQLite runs with a write-ahead journal, so a process killed at any moment loses no
completed result and other processes (``chimera leaderboard``) can read while a search writes.
It deals in plain data only; it knows nothing of genomes or Ray. The query methods return
rows (dicts of the columns, JSON as text), or ``*_records`` the same rows decoded into
``results.records`` types.

Inspect with any SQL tool: ``sqlite3 runs/NAME/results.db 'select * from candidates'``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from results.records import CandidateRecord, RungRecord
from trainers.candidate import FINISHED, UNFINISHED, Status

METRIC_COLUMNS = ("val_loss", "val_bpb", "params", "non_embedding_params", "tokens",
                  "tokens_per_second", "train_flops", "wall_seconds", "peak_memory_mb")

metadata = MetaData()
run_table = Table("run", metadata,
                  Column("key", String(64), primary_key=True),
                  Column("value", Text, nullable=False))
candidates_table = Table(
    "candidates", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # birth order
    Column("genome_key", String(32), nullable=False, index=True),
    Column("genome", Text, nullable=False),  # JSON
    Column("summary", String(200), nullable=False),
    Column("parents", Text, nullable=False),  # JSON list of candidate ids
    Column("operator", String(32), nullable=False),  # seed | random | mutation | crossover
    Column("generation", Integer, nullable=False),
    # a trainers.candidate.Status value: pending | running | ok | diverged | out_of_memory |
    # failed | rejected | cancelled
    Column("status", String(32), nullable=False),
    Column("attempts", Integer),  # runs it took: more than 1 when a worker was lost
    Column("reused_from", Integer),  # set when the genome's earlier result was reused
    Column("val_loss", Float), Column("val_bpb", Float), Column("params", Integer),
    Column("non_embedding_params", Integer), Column("tokens", Integer),
    Column("tokens_per_second", Float), Column("wall_seconds", Float),
    Column("peak_memory_mb", Float),
    Column("train_flops", Float),  # to train it this far (with hurdles: every rung it reached)
    Column("result", Text),  # the full result as JSON (loss curve included)
    Column("error", Text), Column("worker", String(200)),
    Column("created_at", Float, nullable=False), Column("started_at", Float),
    Column("finished_at", Float),
)
_c = candidates_table.c
# The queries' filters (of rows and of records alike); statuses bound as plain strings.
_IS_FINISHED = _c.status.in_([status.value for status in FINISHED])
_IS_UNFINISHED = _c.status.in_([status.value for status in UNFINISHED])
_IS_RUNNING = _c.status == Status.RUNNING.value
_IS_TRAINED_OK = (_c.status == Status.OK.value, _c.reused_from.is_(None))
_BEST_FIRST = (_c.val_bpb, _c.id)
# With hurdles: one row per budget rung a candidate finished (its final rung is also the
# candidate's own result).
rungs_table = Table(
    "rungs", metadata,
    Column("candidate_id", Integer, primary_key=True),
    Column("rung", Integer, primary_key=True),
    Column("status", String(32), nullable=False),
    Column("steps", Integer), Column("tokens", Integer), Column("val_loss", Float),
    Column("val_bpb", Float), Column("wall_seconds", Float),
    Column("result", Text), Column("finished_at", Float, nullable=False),
)


def _describe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL as is; a filesystem path as a SQLite URL."""
    text = str(target)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


class RunDatabaseError(ValueError):
    """A run database that cannot be opened or read: not a database, damaged, not a run's, or a
    URL that does not work (its message names the file or the URL, password hidden)."""


class RunDatabase:
    def __init__(self, target: str | Path, readonly: bool = False) -> None:
        self.url = database_url(target)
        self.name = _describe(self.url)  # for messages: the file, or the URL without password
        sqlite = self.url.startswith("sqlite")
        if sqlite:
            path = Path(self.url.removeprefix("sqlite:///"))
            self.name = str(path)
            if readonly and not path.is_file():
                raise FileNotFoundError(f"{path}: no run database")
            if path.is_dir():
                raise RunDatabaseError(f"{path}: is a directory, not a run database")
            if readonly:  # never create or modify another process's database
                self.url = f"sqlite:///file:{path}?mode=ro&uri=true"
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(self.url)
        except (ArgumentError, NoSuchModuleError) as err:
            raise RunDatabaseError(f"{self.name}: not a database URL SQLAlchemy knows "
                                   f"({err}); use a file path or e.g. "
                                   f"postgresql://user@host/db") from None
        except ImportError as err:  # the dialect's driver is not installed
            raise RunDatabaseError(f"{self.name}: its database driver ({err.name or err}) is "
                                   f"not installed; pip install it, e.g. psycopg2-binary for "
                                   f"postgresql://") from None
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(readonly))
        with self._translated():
            if sqlite:
                self._check_sqlite_file()
            if not readonly:
                metadata.create_all(self.engine)
                _add_missing_columns(self.engine)
            tables = set(inspect(self.engine).get_table_names())
        if "candidates" not in tables:
            raise RunDatabaseError(f"{self.name}: not a Chimera run database (no candidates "
                                   f"table)")
        # A read-only look at a database from an earlier version (which it may not upgrade)
        # selects the columns it has; the newer ones read as None.
        self._candidate_columns = list(candidates_table.c)
        if readonly:
            with self._translated():
                present = {c["name"] for c in inspect(self.engine).get_columns("candidates")}
            self._candidate_columns = [c for c in candidates_table.c if c.name in present] \
                or self._candidate_columns

    def _check_sqlite_file(self) -> None:
        """SQLite reports a damaged file only when a query reaches the damage: look at every
        page once now (results databases are small), so a truncated or overwritten file is
        refused at open, with its name, rather than midway through a command."""
        with self.engine.connect() as conn:
            verdict = conn.execute(text("PRAGMA quick_check")).scalar()
        if verdict != "ok":
            raise RunDatabaseError(f"{self.name}: the database is damaged ({verdict}); restore "
                                   f"it from a copy")

    @contextlib.contextmanager
    def _translated(self):
        """Database failures as ``RunDatabaseError`` naming this database."""
        try:
            yield
        except DBAPIError as err:
            reason = str(err.orig) if err.orig is not None else str(err)
            if "not a database" in reason or "malformed" in reason:
                reason += "; it is not a run database, or it is damaged"
            raise RunDatabaseError(f"{self.name}: {reason}") from None

    def close(self) -> None:
        self.engine.dispose()

    def _write(self, statement):
        with self._translated(), self.engine.begin() as conn:  # one transaction per write
            return conn.execute(statement)

    def _rows(self, statement) -> list[dict]:
        with self._translated(), self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(statement).mappings()]

    def _candidate_rows(self, where=None, order_by=(_c.id,), limit=None) -> list[dict]:
        """Candidate rows with every current column (None where an older database lacks it)."""
        statement = select(*self._candidate_columns).order_by(*order_by).limit(limit)
        if where is not None:
            statement = statement.where(*where)
        return [{c.name: row.get(c.name) for c in candidates_table.c}
                for row in self._rows(statement)]

    # ------------------------------------------------------------------ run configuration
    def set_config(self, config: dict) -> None:
        with self._translated(), self.engine.begin() as conn:
            conn.execute(delete(run_table).where(run_table.c.key == "config"))
            conn.execute(insert(run_table).values(key="config",
                                                  value=json.dumps(config, sort_keys=True)))

    def config(self) -> dict | None:
        rows = self._rows(select(run_table.c.value).where(run_table.c.key == "config"))
        return json.loads(rows[0]["value"]) if rows else None

    # ------------------------------------------------------------------ the Recorder protocol
    def lookup(self, genome_key: str) -> tuple[int, dict] | None:
        rows = self._rows(select(_c.id, _c.result).where(
            _c.genome_key == genome_key, _c.reused_from.is_(None), _IS_FINISHED)
            .order_by(_c.id).limit(1))
        return (rows[0]["id"], json.loads(rows[0]["result"])) if rows else None

    def record_proposal(self, proposal: dict) -> int:
        result = self._write(insert(candidates_table).values(
            genome_key=proposal["genome_key"],
            genome=json.dumps(proposal["genome"], sort_keys=True), summary=proposal["summary"],
            parents=json.dumps(proposal["parents"]), operator=proposal["operator"],
            generation=proposal["generation"], status=Status.PENDING.value,
            created_at=time.time()))
        return result.inserted_primary_key[0]

    def record_start(self, candidate_id: int, worker: str) -> None:
        self._write(update(candidates_table).where(_c.id == candidate_id).values(
            status=Status.RUNNING.value, worker=worker, started_at=time.time(), error=None))

    def record_result(self, candidate_id: int, result: dict) -> None:
        where = {"worker": result["worker"]} if result.get("worker") else {}  # the last attempt's
        self._write(update(candidates_table).where(_c.id == candidate_id).values(**where,
            status=result["status"], result=json.dumps(result), error=result.get("error"),
            attempts=result.get("attempts", 0 if result["status"] == Status.REJECTED else 1),
            finished_at=time.time(), **{c: result.get(c) for c in METRIC_COLUMNS}))

    def record_reused(self, proposal: dict, source_id: int, result: dict) -> int:
        candidate_id = self.record_proposal(proposal)
        self.record_result(candidate_id, result)
        self._write(update(candidates_table).where(_c.id == candidate_id).values(
            reused_from=source_id, worker="reused"))
        return candidate_id

    def record_rung(self, candidate_id: int, rung: int, result: dict) -> None:
        # a retried rung replaces its earlier row
        with self._translated(), self.engine.begin() as conn:
            conn.execute(delete(rungs_table).where(rungs_table.c.candidate_id == candidate_id,
                                                   rungs_table.c.rung == rung))
            conn.execute(insert(rungs_table).values(
                candidate_id=candidate_id, rung=rung, status=result["status"],
                result=json.dumps(result), finished_at=time.time(),
                **{c: result.get(c) for c in ("steps", "tokens", "val_loss", "val_bpb",
                                              "wall_seconds")}))

    def rungs(self, candidate_id: int | None = None) -> list[dict]:
        query = select(rungs_table).order_by(rungs_table.c.candidate_id, rungs_table.c.rung)
        if candidate_id is not None:
            query = query.where(rungs_table.c.candidate_id == candidate_id)
        return self._rows(query)

    def record_cancelled(self, candidate_id: int, reason: str) -> None:
        self._write(update(candidates_table).where(_c.id == candidate_id).values(
            status=Status.CANCELLED.value, error=reason, finished_at=time.time()))

    # ------------------------------------------------------------------ queries
    def candidates(self) -> list[dict]:
        return self._candidate_rows()

    def finished_in_order(self) -> list[dict]:
        """Finished candidates (trained or reused) in birth order: a search's history."""
        return self._candidate_rows((_IS_FINISHED,))

    def unfinished(self) -> list[dict]:
        """Candidates an interrupted search still owes: pending, running or cancelled."""
        return self._candidate_rows((_IS_UNFINISHED,))

    def running(self) -> list[dict]:
        return self._candidate_rows((_IS_RUNNING,))

    def train_flops_spent(self) -> float:
        """Training FLOPs of the run so far: every candidate trained (a hurdled one's last rung
        counts its earlier ones), and the rungs of candidates an interrupted session cut off,
        which a resumed run trains again. Rows of versions that did not record FLOPs count 0."""
        trained = self._rows(select(func.coalesce(func.sum(_c.train_flops), 0.0).label("n"))
                             .where(_IS_FINISHED, _c.reused_from.is_(None)))[0]["n"]
        owed = {row["id"] for row in self.unfinished()}
        furthest: dict[int, float] = {}
        for rung in self.rung_records():
            if rung.candidate_id in owed:
                furthest[rung.candidate_id] = max(furthest.get(rung.candidate_id, 0.0),
                                                  rung.train_flops)
        return float(trained) + sum(furthest.values())

    def leaderboard(self, top: int | None = None) -> list[dict]:
        """Trained candidates that finished ok, best validation bits per byte first."""
        return self._candidate_rows(_IS_TRAINED_OK, order_by=_BEST_FIRST, limit=top)

    def counts(self) -> dict[str, int]:
        rows = self._rows(select(_c.status, func.count().label("n"))
                          .where(_c.reused_from.is_(None)).group_by(_c.status))
        counts = {row["status"]: row["n"] for row in rows}
        counts["reused"] = self._rows(select(func.count().label("n"))
                                      .where(_c.reused_from.is_not(None)))[0]["n"]
        return counts

    # ------------------------------------------------------------------ queries, decoded
    def candidate_records(self) -> list[CandidateRecord]:
        """``candidates()`` decoded."""
        return self._decoded(self.candidates(), CandidateRecord)

    def finished_records(self) -> list[CandidateRecord]:
        """``finished_in_order()`` decoded: a search's history."""
        return self._decoded(self.finished_in_order(), CandidateRecord)

    def unfinished_records(self) -> list[CandidateRecord]:
        """``unfinished()`` decoded."""
        return self._decoded(self.unfinished(), CandidateRecord)

    def running_records(self) -> list[CandidateRecord]:
        """``running()`` decoded."""
        return self._decoded(self.running(), CandidateRecord)

    def parent_genomes(self, records: list[CandidateRecord]) -> dict[int, dict]:
        """The genomes of ``records``' parents, by candidate id (to show what a child
        changed)."""
        ids = sorted({parent for record in records for parent in record.parents})
        if not ids:
            return {}
        rows = self._rows(select(_c.id, _c.genome).where(_c.id.in_(ids)))
        return {row["id"]: json.loads(row["genome"]) for row in rows}

    def leaderboard_records(self, top: int | None = None) -> list[CandidateRecord]:
        """``leaderboard(top)`` decoded."""
        return self._decoded(self.leaderboard(top), CandidateRecord)

    def rung_records(self, candidate_id: int | None = None) -> list[RungRecord]:
        """``rungs(candidate_id)`` decoded."""
        return self._decoded(self.rungs(candidate_id), RungRecord)

    def _decoded(self, rows: list[dict], kind):
        records = []
        for row in rows:
            try:
                records.append(kind.from_row(row))
            except (ValueError, TypeError) as err:  # bad JSON, an unknown status
                which = row.get("id", row.get("candidate_id"))
                raise RunDatabaseError(f"{self.name}: candidate {which} cannot be read "
                                       f"({type(err).__name__}: {err})") from None
        return records


def _add_missing_columns(engine) -> None:
    """Bring a database made by an earlier version up to the current columns (all nullable),
    so ``--resume`` works across upgrades."""
    present = {column["name"] for column in inspect(engine).get_columns("candidates")}
    with engine.begin() as conn:
        for column in candidates_table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE candidates ADD COLUMN {column.name} {kind}"))


def _sqlite_pragmas(readonly: bool):
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")  # wait for a writer instead of failing
        if not readonly:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable commits
        cursor.close()

    return on_connect
