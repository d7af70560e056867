"""A run directory is relocatable: made in one place, moved, then resumed, shown, exported,
trained from and promoted from another working directory, everything in it is found relative to
the folder itself (and the corpus it was made from is no longer needed)."""

import json
import shutil

import pyarrow.parquet as pq

from cluster.cli import main
from results.db import RunDatabase

# A name and a place, so that promote can ask held-out questions about the documents.
BOOK = "\n\n".join(f"Part {i}. A small boat sailed past the {i % 4} lighthouses before the "
                   f"storm, and Mara watched it go from the harbour. Later Mara waited at the "
                   f"harbour." for i in range(80))
TINY = ["--separator", "blank", "--tokenizer", "char", "--batch-size", "4", "--seq-len", "32",
        "--in-process", "--candidate-steps", "3", "--no-live", "--no-warm-start"]
TINY_PROMOTE = ["--in-process", "--trials", "2", "--rungs", "2", "--refine-tokens", "2K",
                "--pretrain-tokens", "3K", "--max-seq-len", "768", "--sft-steps", "2",
                "--sft-conversations", "16", "--sft-seq-len", "640", "--sft-batch-size", "2",
                "--qa-questions", "2"]


def test_a_moved_run_resumes_and_serves_every_command_from_elsewhere(tmp_path, monkeypatch,
                                                                     capsys):
    made, moved, elsewhere = tmp_path / "made", tmp_path / "moved", tmp_path / "elsewhere"
    for folder in (made, moved, elsewhere):
        folder.mkdir()
    (made / "book.txt").write_text(BOOK)
    monkeypatch.chdir(made)  # relative paths, as a user types them
    assert main(["evolve", "--run-dir", "runs/x", "--corpus", "book.txt",
                 "--max-candidates", "2", *TINY]) == 0
    shutil.move(made / "runs", moved / "runs")
    shutil.rmtree(made)  # the corpus and the old working directory are gone
    run = moved / "runs" / "x"
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()

    assert main(["evolve", "--resume", str(run), "--max-candidates", "3", "--in-process",
                 "--no-live"]) == 0
    assert not (elsewhere / "runs").exists()  # nothing started here
    db = RunDatabase(run / "results.db", readonly=True)
    assert len(db.finished_in_order()) == 3
    db.close()

    capsys.readouterr()
    assert main(["leaderboard", str(run), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["export", str(run), "--parquet", "c.parquet"]) == 0
    assert pq.read_table(elsewhere / "c.parquet").num_rows == 3
    assert main(["train", "--run", str(run), "--out", "trained", "--tokens", "2K",
                 "--batch-size", "4", "--seq-len", "32", "--max-seq-len", "64"]) == 0
    assert (elsewhere / "trained" / "model.safetensors").is_file()
    assert main(["promote", str(run), *TINY_PROMOTE]) == 0
    assert (run / "promoted" / "model.safetensors").is_file()  # beside the run, not here
    assert sorted(p.name for p in elsewhere.iterdir()) == ["c.parquet", "trained"]
