"""Rows of the run database decoded once, into records; one status enum for trainer, loop and
database."""

import json
import sqlite3

import pytest

from cluster.cli import main
from results.db import RunDatabase, RunDatabaseError
from results.records import CandidateRecord, RungRecord, as_records
from trainers.candidate import FINISHED, UNFINISHED, Status

GENOME = {"d_model": 64, "n_layers": 2, "mlp_type": "swiglu", "qk_norm": True}
RESULT = {"status": "ok", "val_bpb": 1.25, "val_loss": 0.9, "params": 1234, "tokens": 512,
          "train_flops": 4e9, "wall_seconds": 2.5, "worker": "w0@host", "attempts": 2,
          "rung": 1, "loss_curve": [[1, 3.0], [2, 2.5]]}


def _proposal(key, parents=()):
    return {"genome": GENOME, "genome_key": key, "summary": f"summary {key}",
            "parents": list(parents), "operator": "mutation" if parents else "seed",
            "generation": len(parents)}


def _filled(path):
    db = RunDatabase(path)
    first = db.record_proposal(_proposal("a"))
    db.record_start(first, "w0@host")
    db.record_rung(first, 0, {**RESULT, "rung": 0, "val_bpb": 1.5, "train_flops": 2e9})
    db.record_rung(first, 1, RESULT)
    db.record_result(first, RESULT)
    db.record_proposal(_proposal("b", parents=[first]))  # pending
    return db


def test_a_candidate_row_round_trips_into_a_record(tmp_path):
    db = _filled(tmp_path / "r.db")
    rows, records = db.candidates(), db.candidate_records()
    assert records == [CandidateRecord.from_row(row) for row in rows]
    done, pending = records
    assert done.genome == GENOME and done.parents == () and pending.parents == (done.id,)
    assert done.status is Status.OK and pending.status is Status.PENDING
    assert done.status.finished and not pending.status.finished
    assert done.result == RESULT and done.rung == 1 and pending.result is None
    assert pending.rung == 0
    assert (done.val_bpb, done.params, done.train_flops, done.attempts) == (1.25, 1234, 4e9, 2)
    assert done.worker == "w0@host" and done.reused_from is None and done.error is None
    assert done.created_at <= done.started_at <= done.finished_at
    assert pending.started_at is None and pending.finished_at is None
    # to_dict is the row with its JSON decoded, the columns in the table's order
    decoded = {**rows[0], "genome": GENOME, "parents": [], "result": RESULT}
    assert done.to_dict() == decoded and list(done.to_dict()) == list(rows[0])
    assert json.loads(json.dumps(done.to_dict())) == decoded
    assert db.finished_records() == [done] and db.unfinished_records() == [pending]
    assert db.leaderboard_records() == [done] and db.running_records() == []
    assert as_records(rows) == records and as_records(records) == records


def test_a_rung_row_round_trips_into_a_record(tmp_path):
    db = _filled(tmp_path / "r.db")
    rows, rungs = db.rungs(), db.rung_records()
    assert rungs == [RungRecord.from_row(row) for row in rows]
    assert [(r.rung, r.status, r.val_bpb, r.train_flops) for r in rungs] == \
        [(0, Status.OK, 1.5, 2e9), (1, Status.OK, 1.25, 4e9)]
    assert rungs[1].result == RESULT and rungs[0].steps is None
    assert db.rung_records(rungs[0].candidate_id) == rungs


def test_a_database_of_an_earlier_version_decodes_its_missing_columns_as_none(tmp_path):
    path = tmp_path / "old.db"
    _filled(path).close()
    with sqlite3.connect(path) as conn:  # as a version before these columns were made
        for column in ("train_flops", "attempts", "worker"):
            conn.execute(f"ALTER TABLE candidates DROP COLUMN {column}")
    reader = RunDatabase(path, readonly=True)  # reads it as it is, never upgrades it
    done, pending = reader.candidate_records()
    assert (done.train_flops, done.attempts, done.worker) == (None, None, None)
    assert done.val_bpb == 1.25 and done.genome == GENOME and pending.status is Status.PENDING
    row = {k: v for k, v in reader.candidates()[0].items() if k not in ("result", "started_at")}
    lacking = CandidateRecord.from_row(row)  # a row without the columns at all
    assert lacking.result is None and lacking.started_at is None and lacking.rung == 0


def test_an_unreadable_row_is_a_database_error_naming_the_candidate(tmp_path):
    db = _filled(tmp_path / "r.db")
    with sqlite3.connect(tmp_path / "r.db") as conn:
        conn.execute("UPDATE candidates SET status = 'exploded' WHERE id = 2")
    with pytest.raises(RunDatabaseError, match="candidate 2 cannot be read.*exploded"):
        db.candidate_records()


def test_one_status_enum_spells_the_database_strings():
    assert set(FINISHED) | set(UNFINISHED) == set(Status)
    assert not set(FINISHED) & set(UNFINISHED)
    assert {s.value for s in UNFINISHED} == {"pending", "running", "cancelled"}
    assert Status("rejected") is Status.REJECTED and Status.REJECTED == "rejected"
    assert json.dumps({"status": Status.OK}) == '{"status": "ok"}'


def test_leaderboard_json_is_the_rows_with_genome_and_parents_decoded(tmp_path, capsys):
    db = _filled(tmp_path / "r.db")
    expected = []
    for row in db.leaderboard():  # the shape the command has always printed
        row["genome"], row["parents"] = json.loads(row["genome"]), json.loads(row["parents"])
        row.pop("result")
        expected.append(row)
    assert main(["leaderboard", str(tmp_path / "r.db"), "--json"]) == 0
    assert capsys.readouterr().out == json.dumps(expected, indent=2) + "\n"
