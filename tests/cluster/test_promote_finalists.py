"""Finalists: under ``--budget`` pretraining ranks a size ladder of the run's candidates, and the
best of them, as measured, is the base model (``cluster.app.promote.finalists``)."""

import json

import pytest

import cluster.app.promote.budget as budget_module
import cluster.app.promote.finalists as finalists_module
import cluster.app.promote.pipeline as pipeline_module
from cluster.app.promote.finalists import (
    FINALIST_GROWTH,
    MIN_FINALIST_STEPS,
    affordable,
    ladder,
    size_ladder,
)
from cluster.app.promote.settings import run_settings
from cluster.cli import main
from results.db import RunDatabase
from search.genome import Genome

TINY_RUN = ["--corpus-size", "60KB", "--tokenizer", "bpe", "--vocab-size", "400",
            "--batch-size", "4", "--seq-len", "32", "--population", "6", "--tournament", "2",
            "--in-process", "--max-candidates", "5", "--candidate-steps", "5", "--no-live"]
TINY_SFT = ["--max-seq-len", "512", "--sft-steps", "4", "--sft-conversations", "40",
            "--sft-seq-len", "256", "--sft-batch-size", "4", "--qa-questions", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finalists") / "run"
    assert main(["evolve", "--run-dir", str(run), *TINY_RUN]) == 0
    return run


def leaderboard(run):
    db = RunDatabase(run_settings(str(run)).database_target, readonly=True)
    try:
        return db.leaderboard_records()
    finally:
        db.close()


def test_the_ladder_is_the_best_then_the_best_ranked_of_each_larger_size():
    sizes = {1: 400, 2: 300, 3: 700, 4: 900, 5: 2_000, 6: 1_900, 7: 10_000}  # id: params
    ranked = [(i, Genome(d_model=8 * i, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2,
                         recurrence_ratio=1, window_size=16, dropout=0.0))
              for i in sizes]  # ranked by id
    params_of = lambda genome: sizes[genome.d_model // 8]  # noqa: E731
    ids = lambda count: [f.candidate_id for f in ladder(ranked, count, params_of)]  # noqa: E731
    # 1 (400) leads; 2 and 3 are under twice its size, 4 (900) is the first over; then 5
    # (2,000: twice 900 is 1,800); 6 (1,900) is under twice 2,000; then 7.
    assert FINALIST_GROWTH == 2.0
    assert ids(10) == [1, 4, 5, 7]
    assert ids(2) == [1, 4] and ids(1) == [1]
    assert [f.params for f in ladder(ranked, 3, params_of)] == [400, 900, 2_000]


def test_the_run_s_ladder_starts_at_its_winner(run):
    finalists = size_ladder(str(run), 3, 400, 512)
    assert finalists[0].candidate_id == leaderboard(run)[0].id
    assert all(b.params >= FINALIST_GROWTH * a.params for a, b in zip(finalists, finalists[1:]))


def test_finalists_are_as_many_as_pretraining_gives_their_minimum_steps():
    step_tokens = 128
    seconds_for = lambda n: n * MIN_FINALIST_STEPS * step_tokens / 1000.0  # noqa: E731
    assert affordable(3, seconds_for(3), 1000.0, step_tokens) == 3
    assert affordable(3, seconds_for(2.5), 1000.0, step_tokens) == 2
    assert affordable(3, seconds_for(0.5), 1000.0, step_tokens) == 1  # the winner always
    assert affordable(1, seconds_for(10), 1000.0, step_tokens) == 1


def test_the_best_finalist_as_measured_is_the_base_model_and_a_rerun_resumes(run, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(finalists_module, "FINALIST_GROWTH", 0.0)  # the top two, any size
    monkeypatch.setattr(budget_module, "measure_tokens_per_second", lambda *a, **k: 20_000.0)
    monkeypatch.setattr(pipeline_module, "measure_tokens_per_second", lambda *a, **k: 20_000.0)
    monkeypatch.setattr(budget_module, "SFT_HEADROOM", 1e6)
    # Interrupted as the second finalist begins: the first is kept, the rerun trains the rest.
    trained, train = [], pipeline_module._train_base

    def interrupted_once(ctx, config, *args):
        if len(trained) == 1 and not interrupted_once.done:
            interrupted_once.done = True
            raise KeyboardInterrupt
        trained.append(config.d_model)
        return train(ctx, config, *args)

    interrupted_once.done = False
    monkeypatch.setattr(pipeline_module, "_train_base", interrupted_once)
    command = ["promote", str(run), "--budget", "40s", "--finalists", "2", *TINY_SFT]
    assert main(command) == 130
    assert len(trained) == 1
    assert main(command) == 0
    assert len(trained) == 2  # the first finalist was not trained again
    out = run / "promoted"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget_plan"]["finalists"] == 2
    finalists = metrics["finalists"]
    ranked = leaderboard(run)
    assert [f["candidate_id"] for f in finalists] == [ranked[0].id, ranked[1].id]
    best = min(finalists, key=lambda f: f["val_bpb"])
    # The kept model is the one the ranking measured: the evaluation scores the same
    # validation windows, and finds what the finalist's own best evaluation found.
    assert metrics["candidate_id"] == best["candidate_id"]
    assert metrics["genome"] == best["genome"]
    assert metrics["heldout_bpb"]["base"] == pytest.approx(best["val_bpb"], rel=1e-5)
    assert metrics["dropout"] == best["dropout"]
    config = json.loads((out / "base" / "config.json").read_text())
    other = next(f for f in finalists if f is not best)
    assert (out / "finalists" / f"candidate-{other['candidate_id']}" / "config.json").is_file()
    assert not (out / "finalists" / f"candidate-{best['candidate_id']}").exists()
    assert config["dropout"] == best["dropout"]
    # The two shared pretraining's seconds, and its time counts both attempts' work.
    plan = metrics["budget_plan"]
    assert sum(f["seconds"] for f in finalists) <= metrics["seconds"]["pretrain"] \
        <= plan["pretrain_seconds"] + 20
    assert "finalists' validation bpb" in capsys.readouterr().out
    assert f"| #{other['candidate_id']} |" in (out / "report.md").read_text()
    # Another count is another promote: refused, naming the flag; so is leaving the flag out
    # (the default, one finalist), which the recorded settings alone can show.
    for other_count in (["--finalists", "3"], []):
        assert main(["promote", str(run), "--budget", "40s", *other_count, *TINY_SFT]) == 2
        assert "--finalists" in capsys.readouterr().err
