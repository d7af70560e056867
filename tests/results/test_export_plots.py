"""`chimera export --parquet` round-trips the run database; `chimera plot` writes real PNGs."""

import json

import matplotlib.image
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from results.db import RunDatabase
from results.plots import (
    ancestors,
    best_so_far_figure,
    compute_and_scores,
    fully_trained,
    trained_ok,
)
from search.evolution import AgingEvolution, EvolutionConfig
from search.genome import CPU
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop


def _fake_train(genome, candidate_id=0, rung=0):
    # a made-up score that prefers wide, shallow models, and a parameter count from the genome
    if genome.n_layers % 3 == 0:
        return {"status": "diverged", "error": "loss nan at step 3", "wall_seconds": 1.0}
    bpb = 2.0 - genome.d_model / 256 + genome.n_layers / 20
    return {"status": "ok", "val_bpb": bpb, "val_loss": bpb * 0.7, "wall_seconds": 2.0,
            "params": CPU.params(genome), "tokens": 1000, "attempts": 1, "worker": "w@h",
            "train_flops": 6000.0 * CPU.params(genome)}


@pytest.fixture
def run_db(tmp_path):
    """A finished search of 24 candidates (seeds, mutations, crossovers, one repeat or more)."""
    path = tmp_path / "run" / "results.db"
    db = RunDatabase(path)
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=6, tournament_size=2), 0)
    SearchLoop(strategy, InProcessEvaluator(_fake_train), db,
               SearchLimits(max_candidates=24)).run()
    db.close()
    return path


def test_export_round_trips_every_candidate(run_db, tmp_path, capsys):
    out = tmp_path / "out" / "run.parquet"
    assert main(["export", str(run_db), "--parquet", str(out)]) == 0
    assert "wrote 24 candidates" in capsys.readouterr().out
    table = pq.read_table(out)
    rows = RunDatabase(run_db, readonly=True).candidates()
    exported = table.to_pylist()
    assert len(exported) == len(rows) == 24
    for row, back in zip(rows, exported, strict=True):
        genome = json.loads(row["genome"])
        assert {gene: back[gene] for gene in genome} == genome
        assert back["parents"] == json.loads(row["parents"])
        for column in ("id", "genome_key", "summary", "operator", "generation", "status",
                       "reused_from", "attempts", "val_bpb", "val_loss", "params", "error",
                       "worker", "result", "train_flops"):
            assert back[column] == row[column], column
        assert back["finished_at"].timestamp() == pytest.approx(row["finished_at"], abs=1e-3)
    assert {"ok", "diverged"} <= set(table.column("status").to_pylist())
    assert not list(out.parent.glob(".run.parquet.*"))  # no temporary file left behind


def test_plot_writes_three_pngs_and_follows_the_winners_lineage(run_db, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(run_db), "--out", str(out)]) == 0
    for name in ("best_so_far.png", "pareto.png", "lineage.png"):
        image = matplotlib.image.imread(out / name)  # a real PNG, with pixels
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0
    db = RunDatabase(run_db, readonly=True)
    winner = db.leaderboard_records(1)[0]
    family = ancestors(db.candidate_records(), winner.id)
    assert winner.id in family
    for record in family.values():  # closed under parents
        assert all(parent in family for parent in record.parents)


def test_plot_in_flops_and_a_clean_error_where_none_were_recorded(run_db, tmp_path, capsys):
    assert main(["plot", str(run_db), "--out", str(tmp_path / "plots"), "--flops"]) == 0
    rows = RunDatabase(run_db, readonly=True).candidate_records()
    figure = best_so_far_figure(rows, flops=True)
    spent = sum(r.train_flops or 0.0 for r in rows if r.reused_from is None)
    assert figure.axes[0].lines[0].get_xdata()[-1] == pytest.approx(spent)
    assert figure.axes[0].get_xlabel() == "compute (training FLOPs)"
    old = RunDatabase(tmp_path / "old.db")  # a run whose results carry no FLOPs
    SearchLoop(AgingEvolution(CPU, EvolutionConfig(population_size=4, tournament_size=2), 0),
               InProcessEvaluator(lambda genome, *_: {k: v for k, v in _fake_train(genome).items()
                                                      if k != "train_flops"}),
               old, SearchLimits(max_candidates=4)).run()
    old.close()
    assert main(["plot", str(tmp_path / "old.db"), "--flops"]) == 2
    assert "no training FLOPs recorded" in capsys.readouterr().err


def test_plot_of_a_run_with_nothing_finished_is_a_clean_error(tmp_path, capsys):
    RunDatabase(tmp_path / "results.db").close()
    assert main(["plot", str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_with_hurdles_plots_count_every_rung_and_compare_only_full_budgets(tmp_path):
    from search.hurdles import Hurdles

    def train(genome, candidate_id, rung):
        result = _fake_train(genome)
        if result["status"] == "ok":  # each rung improves, and costs 2 s
            result["val_bpb"] -= 0.5 * (2 - rung)
        return {**result, "rung": rung}

    db = RunDatabase(tmp_path / "results.db")
    strategy = AgingEvolution(CPU, EvolutionConfig(population_size=6, tournament_size=2), 0)
    SearchLoop(strategy, InProcessEvaluator(train), db, SearchLimits(max_candidates=20),
               hurdles=Hurdles(rungs=3, keep_fraction=1 / 3)).run()
    rows, rungs = db.candidate_records(), db.rung_records()
    full = fully_trained(rows, rungs)
    reached = {r.candidate_id for r in rungs if r.rung == 2}
    assert full and {r.id for r in full} == reached < {r.id for r in trained_ok(rows)}
    figure = best_so_far_figure(rows, rungs=rungs)
    (scatter,) = figure.axes[0].collections
    best_line = figure.axes[0].lines[0]
    assert best_line.get_xdata()[-1] == pytest.approx(sum(r.wall_seconds for r in rungs) / 3600)
    assert len(scatter.get_offsets()) == len(full)  # early stops are not scored
    assert best_line.get_ydata()[-1] == min(r.val_bpb for r in full)


def test_compute_in_flops_charges_each_rung_what_it_added(tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    proposal = {"genome": {}, "summary": "", "parents": [], "operator": "random",
                "generation": 0}
    # A rung result counts the candidate's training so far: 100, then 300 in all (rung 1
    # added 200); the other candidate stopped at rung 0 after 150.
    a = db.record_proposal({**proposal, "genome_key": "a"})
    b = db.record_proposal({**proposal, "genome_key": "b"})
    db.record_rung(a, 0, {"status": "ok", "val_bpb": 3.0, "train_flops": 100.0,
                          "wall_seconds": 1.0})
    db.record_rung(b, 0, {"status": "ok", "val_bpb": 3.5, "train_flops": 150.0,
                          "wall_seconds": 1.0})
    db.record_rung(a, 1, {"status": "ok", "val_bpb": 2.5, "train_flops": 300.0,
                          "wall_seconds": 2.0})
    rows, rungs = db.candidate_records(), db.rung_records()
    assert compute_and_scores(rows, rungs, flops=True) == [(100.0, None), (250.0, None),
                                                           (450.0, 2.5)]
    assert compute_and_scores(rows, rungs) == [(1.0, None), (2.0, None), (4.0, 2.5)]
