"""The run database and its rendering."""

import json

from rich.console import Console

from results.db import RunDatabase
from results.leaderboard import leaderboard_table, live_view
from search.genome import Genome, genome_changes


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


def _genome(**genes):
    base = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2.0,
                recurrence_ratio=1, window_size=16, dropout=0.0)
    return {**base, **genes}


def test_a_child_shows_its_parents_and_what_it_changed(tmp_path):
    db = RunDatabase(tmp_path / "r.db")
    parent = db.record_proposal({"genome": _genome(), "genome_key": "p", "summary": "parent",
                                 "parents": [], "operator": "seed", "generation": 0})
    child = db.record_proposal({"genome": _genome(d_model=96, dropout=0.1), "genome_key": "c",
                                "summary": "child", "parents": [parent],
                                "operator": "mutation", "generation": 1})
    for cid, bpb in ((parent, 1.2), (child, 1.1)):
        db.record_result(cid, {"status": "ok", "val_bpb": bpb})
    leaders = db.leaderboard_records()
    genomes = db.parent_genomes(leaders)
    assert genomes == {parent: _genome()}
    console = Console(record=True, width=200)
    console.print(leaderboard_table(leaders, parent_genomes=genomes))
    text = console.export_text()
    assert f"mutation of {parent}: d_model 64>96, dropout 0>0.1" in text
    child_row = [line for line in text.splitlines() if "child" in line][0]
    assert child_row.split()[1:4:2] == ["1", str(child)]  # the better child ranks first
    # Without the parents' genomes the origin still names them.
    console = Console(record=True, width=200)
    console.print(leaderboard_table(leaders))
    assert f"mutation of {parent}" in console.export_text()
    assert "d_model 64>96" not in console.export_text()


def test_a_gene_the_model_does_not_read_is_no_change():
    all_recurrent = Genome.from_dict(_genome(n_layers=2, recurrence_ratio=2))
    other_window = Genome.from_dict(_genome(n_layers=2, recurrence_ratio=2, window_size=64))
    assert genome_changes(all_recurrent, other_window) == ""
    assert genome_changes(Genome.from_dict(_genome()), other_window) == "recurrence_ratio 1>2"
