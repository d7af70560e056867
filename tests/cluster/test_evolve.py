"""`chimera evolve` end to end: in-process and on Ray, resume after SIGKILL, live leaderboard."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.cli.argtypes import parse_duration

TINY = ["--corpus-size", "60KB", "--tokenizer", "char", "--batch-size", "4", "--seq-len", "32",
        "--population", "4", "--tournament", "2", "--no-live"]


def _evolve_argv(run_dir, *extra):
    return ["evolve", "--run-dir", str(run_dir), *TINY, *extra]


def _finished(run_dir):
    with sqlite3.connect(Path(run_dir) / "results.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT * FROM candidates WHERE status IN ('ok','diverged','failed','out_of_memory') "
            "ORDER BY id")]


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (sqlite3.Error, FileNotFoundError):
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_evolve_in_process_finds_a_clearly_better_model_and_is_deterministic(tmp_path, capsys):
    argv = ["--in-process", "--max-candidates", "6", "--candidate-steps", "15", "--seed", "3"]
    assert main(_evolve_argv(tmp_path / "a", *argv)) == 0
    out = capsys.readouterr().out
    assert "leaderboard of" in out and "best: #" in out
    rows = _finished(tmp_path / "a")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    bpbs = sorted(r["val_bpb"] for r in rows)
    assert bpbs[0] < bpbs[-1] - 0.05  # the best beats the worst clearly
    assert (tmp_path / "a" / "run.json").is_file() and (tmp_path / "a" / "store").is_dir()
    assert main(_evolve_argv(tmp_path / "b", *argv)) == 0
    again = _finished(tmp_path / "b")
    assert [(r["genome_key"], r["val_bpb"]) for r in again] == \
        [(r["genome_key"], r["val_bpb"]) for r in rows]


def _spawn_evolve(run, max_candidates):
    """A search in another process, slow enough per candidate to be caught mid-run."""
    argv = _evolve_argv(run, "--in-process", "--max-candidates", str(max_candidates),
                        "--candidate-steps", "40")
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_evolve_killed_with_sigkill_resumes_losing_and_repeating_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _spawn_evolve(run, 8)
    try:
        _wait_for(lambda: len(_finished(run)) >= 3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {r["id"]: r for r in _finished(run)}
    assert 3 <= len(before) < 8

    assert main(["evolve", "--resume", str(run), "--in-process", "--max-candidates", "8",
                 "--no-live"]) == 0
    after = _finished(run)
    assert len(after) == 8
    for row in after:  # nothing completed was lost or changed
        if row["id"] in before:
            assert row["result"] == before[row["id"]]["result"]
    trained = [r["genome_key"] for r in after if r["reused_from"] is None]
    assert len(trained) == len(set(trained))  # nothing trained twice
    assert sorted(r["id"] for r in after) == list(range(1, 9))  # the interrupted one finished


def test_leaderboard_command_reads_a_live_run(tmp_path, capsys):
    run = tmp_path / "live"
    proc = _spawn_evolve(run, 30)
    try:
        _wait_for(lambda: len(_finished(run)) >= 2)
        assert main(["leaderboard", str(run), "--json", "--top", "3"]) == 0
        assert proc.poll() is None  # the search was still running while we read
        rows = json.loads(capsys.readouterr().out)
        assert 2 <= len(rows) <= 3 and rows[0]["val_bpb"] <= rows[-1]["val_bpb"]
        assert isinstance(rows[0]["genome"], dict) and "d_model" in rows[0]["genome"]
        assert main(["leaderboard", str(run)]) == 0
        assert "val bpb" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_results_can_go_to_a_database_url(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'shared.db'}"
    argv = ["--in-process", "--max-candidates", "3", "--candidate-steps", "5", "--database", url]
    assert main(_evolve_argv(tmp_path / "run", *argv)) == 0
    assert not (tmp_path / "run" / "results.db").exists()
    assert (tmp_path / "elsewhere" / "shared.db").is_file()
    capsys.readouterr()
    for target in (url, str(tmp_path / "run")):  # by URL, or by the run that names it
        assert main(["leaderboard", target, "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 3


def test_leaderboard_of_a_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nope")]) == 2
    assert "no run database" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["evolve", "--resume", str(tmp_path), "--no-live"]) == 2
    assert "not a Chimera run" in capsys.readouterr().err


def test_a_bad_search_option_is_a_clean_error(tmp_path, capsys):
    assert main(_evolve_argv(tmp_path / "run", "--gene-pool", "1.5")) == 2
    assert "gene_pool_fraction=1.5: must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


@pytest.fixture
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_evolve_on_a_local_ray_cluster_uses_every_worker(tmp_path, local_ray, capsys):
    run = tmp_path / "ray"
    assert main(_evolve_argv(run, "--workers", "2", "--max-candidates", "6",
                             "--candidate-steps", "15")) == 0
    rows = _finished(run)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    # actors are named after the run, as the Ray dashboard shows them
    assert {r["worker"].split("@")[0] for r in rows} == {"ray-worker-0", "ray-worker-1"}


def test_durations_parse():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize("strategy", ["random", "tpe", "nsga2"])
def test_baseline_strategies_run_the_same_search(tmp_path, strategy, capsys):
    run = tmp_path / strategy
    assert main(_evolve_argv(run, "--in-process", "--strategy", strategy, "--max-candidates",
                             "3", "--candidate-steps", "3", "--no-warm-start")) == 0
    rows = _finished(run)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert {r["operator"] for r in rows} == {strategy}
    assert json.loads((run / "run.json").read_text())["strategy"] == strategy


def test_hurdles_continue_cleared_candidates_from_their_checkpoints(tmp_path, capsys):
    """Real training in process: rung 0 = 3 steps, rung 1 = 6 steps. A continued candidate's
    final result equals training its genome for 6 steps in one go (same schedule, data, seed),
    so the continuation really resumed from the rung-0 checkpoint."""
    from cluster.app.evolve import load_settings
    from search.genome import Genome
    from trainers.candidate import BudgetKind, TrainBudget, train_candidate
    from trainers.store import TokenStore

    run = tmp_path / "hurdles"
    assert main(_evolve_argv(run, "--in-process", "--max-candidates", "4", "--candidate-steps",
                             "3", "--hurdles", "2", "--hurdle-factor", "2",
                             "--hurdle-window", "3")) == 0
    settings = load_settings(run)
    assert settings.hurdles.rungs == 2 and settings.hurdles.window == 3
    with sqlite3.connect(run / "results.db") as conn:
        conn.row_factory = sqlite3.Row
        rungs = [dict(r) for r in conn.execute("SELECT * FROM rungs ORDER BY candidate_id, rung")]
        rows = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM candidates")}
    continued = [r["candidate_id"] for r in rungs if r["rung"] == 1]
    assert continued, "the first candidates always clear (min_results)"
    assert all(r["steps"] == 3 for r in rungs if r["rung"] == 0)
    store = TokenStore.open(run / "store")
    candidate = rows[continued[0]]
    final = json.loads(candidate["result"])
    assert final["rung"] == 1 and final["steps"] == 6
    config = Genome.from_dict(json.loads(candidate["genome"])).to_config(
        store.vocab_size, settings.hparams.seq_len)
    straight = train_candidate(config, store, TrainBudget(BudgetKind.STEPS, 6),
                               settings.hparams, seed=settings.seed)
    assert final["val_loss"] == pytest.approx(straight.val_loss, rel=1e-6)
    assert not (run / "checkpoints").exists()  # nothing left behind

    # A resume rebuilds what the hurdles and the population knew: every rung's results set the
    # bars again, and each member keeps the rung it reached.
    from cluster.app.evolve import _rung_history, build_strategy
    from results.db import RunDatabase

    db = RunDatabase(run / "results.db", readonly=True)
    try:
        # In the order results arrived, which a windowed bar depends on.
        arrived = sorted(rungs, key=lambda r: r["finished_at"])
        assert _rung_history(db) == [(r["rung"], r["val_bpb"]) for r in arrived]
        strategy, _, _ = build_strategy(settings, store.vocab_size, db)
    finally:
        db.close()
    assert {m.candidate_id: m.rung for m in strategy.population} == {
        i: json.loads(r["result"])["rung"] for i, r in rows.items()}


def test_pareto_search_with_a_parameter_budget(tmp_path, capsys):
    run = tmp_path / "pareto"
    assert main(_evolve_argv(run, "--in-process", "--max-candidates", "4", "--candidate-steps",
                             "3", "--objective", "bpb,params", "--max-params", "400000")) == 0
    rows = _finished(run)
    assert len(rows) == 4 and all(r["params"] <= 400_000 for r in rows)
    settings = json.loads((run / "run.json").read_text())
    assert settings["objectives"] == ["bpb", "params"] and settings["max_params"] == 400_000
    assert main(_evolve_argv(tmp_path / "bad", "--objective", "bpb,latency")) == 2
    assert "unknown objective" in capsys.readouterr().err


def test_the_validation_split_follows_the_data_seed_not_the_search_seed(tmp_path):
    """Runs with different search seeds are scored on the same documents, so they compare."""
    from rich.console import Console

    from cluster.app.evolve import EvolveSettings, prepare_data
    from trainers.corpus import CorpusSpec

    def validation(name, **seeds):
        settings = EvolveSettings(run_dir=str(tmp_path / name), tokenizer="char",
                                  corpus=CorpusSpec("stories", stories_bytes=60_000), **seeds)
        return prepare_data(settings, Console(quiet=True)).tokens("val").tolist()

    shared = validation("a", seed=1)
    assert validation("b", seed=2) == shared
    assert validation("c", seed=1, data_seed=1) != shared
    # a run made before the data seed existed drew its split from its search seed: resumed, it
    # must find the same store
    old = EvolveSettings(run_dir=str(tmp_path / "d"), seed=5, data_seed=5).to_dict()
    del old["data_seed"]
    assert EvolveSettings.from_dict(old).data_seed == 5


def test_a_flops_budget_holds_across_sessions(tmp_path, capsys):
    """Real training in process: every candidate records the FLOPs of its training, and a
    FLOPs budget counts every session of the run."""
    from chimera.model import training_flops_per_token
    from cluster.app.evolve import load_settings
    from results.db import RunDatabase
    from search.genome import Genome
    from trainers.store import TokenStore

    run = tmp_path / "flops"
    assert main(_evolve_argv(run, "--in-process", "--max-candidates", "3", "--candidate-steps",
                             "3", "--no-warm-start")) == 0
    settings, vocab = load_settings(run), TokenStore.open(run / "store").vocab_size
    seq_len = settings.hparams.seq_len
    rows = _finished(run)
    for row in rows:  # the model's count of what it trained
        config = Genome.from_dict(json.loads(row["genome"])).to_config(vocab, seq_len)
        assert row["train_flops"] == row["tokens"] * training_flops_per_token(config, seq_len)
    db = RunDatabase(run / "results.db", readonly=True)
    spent = db.train_flops_spent()
    db.close()
    assert spent == sum(row["train_flops"] for row in rows) > 0
    # Resumed with a budget it has spent already: nothing more trains.
    capsys.readouterr()
    assert main(["evolve", "--resume", str(run), "--in-process", "--no-live", "--flops",
                 f"{spent:.6e}"]) == 0
    assert "compute budget" in capsys.readouterr().out and len(_finished(run)) == 3
    # With three times as much, more train, and the run as a whole stays within it.
    assert main(["evolve", "--resume", str(run), "--in-process", "--no-live", "--flops",
                 f"{3 * spent:.6e}"]) == 0
    more = _finished(run)
    assert len(more) > 3 and sum(row["train_flops"] for row in more) <= 3 * spent
    assert main(_evolve_argv(tmp_path / "bad", "--flops", "20T", "--candidate-seconds",
                             "5")) == 2
    assert "FLOPs budget needs a step or token budget" in capsys.readouterr().err


def test_flops_parse():
    from cluster.cli.argtypes import parse_flops

    assert parse_flops("2e13") == 2e13 and parse_flops("20T") == 2e13
    assert parse_flops("1.5P") == 1.5e15 and parse_flops("3.2e+12") == 3.2e12
    with pytest.raises(Exception, match="not a positive number of FLOPs"):
        parse_flops("lots")
    with pytest.raises(Exception, match="not a positive number of FLOPs"):
        parse_flops("0")


def test_a_budget_is_the_commands_wall_clock_its_start_up_included(tmp_path, monkeypatch):
    """What the command spent before the search (its start-up, the store) comes out of the
    search's time: with all but a second of a 20-second budget gone, no candidate fits."""
    from rich.console import Console

    import cluster.cli.clock as clock
    from cluster.app.evolve import EvolveSettings, run_evolve
    from search.loop import SearchLimits
    from trainers.corpus import CorpusSpec

    monkeypatch.setattr(sys, "argv", ["chimera"])
    assert clock.seconds_since_launch() > 0  # this process has run a while
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert clock.seconds_since_launch() == 0  # inside another program: nothing to count

    settings = EvolveSettings(run_dir=str(tmp_path / "run"), tokenizer="char",
                              corpus=CorpusSpec("stories", stories_bytes=60_000),
                              limits=SearchLimits(wall_seconds=20), in_process=True)
    outcome = run_evolve(settings, Console(quiet=True), live=False, spent_seconds=19)
    assert outcome.report.launched == 0
    assert "time budget" in outcome.report.stop_reason
