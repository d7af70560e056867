"""The run database and its rendering."""

import json

from rich.console import Console

from results.db import RunDatabase
from results.leaderboard import live_view


def _proposal(i, summary):
    return {"genome": {"d_model": 64 + i}, "genome_key": f"k{i}", "summary": summary,
            "parents": [i - 1] if i else [], "operator": "mutation" if i else "seed",
            "generation": i}


def _fill(db):
    for i, (status, bpb) in enumerate([("ok", 1.5), ("ok", 0.9), ("diverged", None),
                                       ("ok", 1.1)]):
        cid = db.record_proposal(_proposal(i, f"d{64 + i} L{i + 2} RRA w64 h4 kv2 f3"))
        db.record_start(cid, f"worker-{i % 2}")
        db.record_result(cid, {"status": status, "val_bpb": bpb, "val_loss": bpb,
                               "params": 123456 * (i + 1), "tokens_per_second": 5000.0 + i,
                               "wall_seconds": 3.0})
    running = db.record_proposal(_proposal(4, "d96 L4 RA w32 h2 kv1 f2"))
    db.record_start(running, "worker-1")


def test_database_orders_the_leaderboard_and_counts(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    _fill(db)
    assert [r["val_bpb"] for r in db.leaderboard()] == [0.9, 1.1, 1.5]
    assert db.counts() == {"ok": 3, "diverged": 1, "running": 1, "reused": 0}
    assert db.lookup("k1")[1]["val_bpb"] == 0.9 and db.lookup("k4") is None
    db.set_config({"seed": 3})
    reader = RunDatabase(tmp_path / "r.db", readonly=True)  # another process's view
    assert reader.config() == {"seed": 3} and len(reader.candidates()) == 5


def test_live_view_renders_budget_workers_and_leaderboard_columns(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    _fill(db)
    console = Console(record=True, width=140)
    console.print(live_view(db.leaderboard(5), db.running(), db.counts(), elapsed=30,
                            wall_seconds=120, max_candidates=None))
    text = console.export_text()
    for expected in ("budget 30s / 120s, ETA 90s", "worker-1", "d96 L4 RA w32 h2 kv1 f2",
                     "rank", "genome", "params", "val bpb", "tok/s", "status", "origin",
                     "d65 L3 RRA w64 h4 kv2 f3", "0.9000", "247K", "5,001",
                     "done 3", "diverged 1", "running 1"):
        assert expected in text, expected
    first_row = [line for line in text.splitlines() if "0.9000" in line][0]
    assert first_row.split()[1] == "1"  # rank 1 is the lowest bpb


def test_a_flops_budget_is_the_progress_shown(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    _fill(db)
    console = Console(record=True, width=140)
    console.print(live_view([], [], db.counts(), elapsed=30, wall_seconds=None,
                            max_candidates=None, flops=(5e12, 2e13)))
    assert "compute 5e+12 / 2e+13 training FLOPs, 30s" in console.export_text()


def test_results_are_json_for_other_tools(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    _fill(db)
    row = db.leaderboard(1)[0]
    assert json.loads(row["result"])["val_bpb"] == 0.9 and json.loads(row["parents"]) == [0]
