"""The bad-input sweep: every subcommand, given what a hostile but fair user gives it, answers
with exit status 2 and one line that names the file or flag, never a traceback, and leaves
everything the user had exactly as it was (the folder's checksum before and after).

Each case runs in a fresh copy of one small world: a text corpus, a token store, a finished
search run and a model directory. ``main`` is the console script's entry point, so an
exception that escaped it would be a traceback on the user's screen.
"""

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from chimera.tokenizer import load_tokenizer, train_char
from cluster.cli import main

BOOK = "\n\n".join(f"Chapter {i}. The fox ran over the hill to see the {i % 5} geese, and the "
                   f"geese said nothing at all." for i in range(80))
TINY_EVOLVE = ["--corpus", "book.txt", "--separator", "blank", "--tokenizer", "char",
               "--batch-size", "4", "--seq-len", "32", "--in-process", "--max-candidates", "2",
               "--candidate-steps", "3", "--no-live", "--no-warm-start"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_model_dir):
    """The user's folder: book.txt, store/, run/ (a finished search), model/."""
    root = tmp_path_factory.mktemp("world")
    (root / "book.txt").write_text(BOOK)
    assert main(["data", "prepare", "--corpus", str(root / "book.txt"), "--separator", "blank",
                 "--tokenizer", "char", "--out", str(root / "store")]) == 0
    cwd = Path.cwd()
    try:  # the run records the corpus as given, relative to where it was made
        os.chdir(root)
        assert main(["evolve", "--run-dir", "run", *TINY_EVOLVE]) == 0
    finally:
        os.chdir(cwd)
    make_model_dir(root / "model", load_tokenizer(root / "store" / "tokenizer"))
    return root


SQLITE_SIDECARS = ("-shm", "-wal")  # SQLite's own files, which any reader of a WAL database
# may create beside it (and the last one to close removes): not the user's data


def checksum(folder: Path) -> str:
    """Every path under ``folder`` with its content: any file added, removed or changed shows."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(SQLITE_SIDECARS):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- damage
def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (default: the middle one, inside the data)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def user_folder(root: Path) -> None:
    (root / "mine").mkdir()
    (root / "mine" / "important.txt").write_text("the user's own notes\n")


def other_tokenizer(root: Path) -> None:
    """store/ with the tokenizer of another corpus put in it."""
    shutil.rmtree(root / "store" / "tokenizer")
    train_char(["only a few letters"]).save_pretrained(str(root / "store" / "tokenizer"))


def smaller_tokenizer(root: Path) -> None:
    """model/ with a tokenizer that has fewer tokens than the model's vocabulary."""
    shutil.rmtree(root / "model" / "tokenizer")
    train_char(["abc"]).save_pretrained(str(root / "model" / "tokenizer"))


def truncated_results_db(root: Path) -> None:
    db = root / "run" / "results.db"
    with sqlite3.connect(db) as conn:  # fold the write-ahead log in, so the file is whole
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    truncate(db, 0.6)


def nothing(root: Path) -> None:
    pass


# (id, damage done to the world first, argv, what the error line must say)
CASES = [
    # --- data prepare: a store replaces only a store
    ("prepare-into-user-folder", user_folder,
     ["data", "prepare", "--corpus", "book.txt", "--separator", "blank", "--tokenizer", "char",
      "--out", "mine"], "not a token store"),
    ("prepare-into-a-file", nothing,
     ["data", "prepare", "--corpus", "book.txt", "--separator", "blank", "--tokenizer", "char",
      "--out", "book.txt"], "not a directory"),
    ("prepare-into-cwd", nothing,
     ["data", "prepare", "--corpus", "book.txt", "--separator", "blank", "--tokenizer", "char",
      "--out", "."], "current directory"),
    ("prepare-missing-corpus", nothing,
     ["data", "prepare", "--corpus", "nope.txt", "--tokenizer", "char", "--out", "s2"],
     "nope.txt"),
    ("prepare-empty-corpus", lambda r: (r / "empty.txt").write_text(""),
     ["data", "prepare", "--corpus", "empty.txt", "--tokenizer", "char", "--out", "s2"],
     "empty.txt"),
    ("prepare-binary-corpus", lambda r: garbage(r / "blob.txt"),
     ["data", "prepare", "--corpus", "blob.txt", "--tokenizer", "char", "--out", "s2"],
     "blob.txt"),
    ("prepare-folder-without-corpus", lambda r: (r / "pics").mkdir(),
     ["data", "prepare", "--corpus", "pics", "--tokenizer", "char", "--out", "s2"], "pics"),
    ("prepare-bad-size", nothing,
     ["data", "prepare", "--corpus", "stories", "--corpus-size", "lots", "--tokenizer", "char",
      "--out", "s2"], "--corpus-size"),
    ("prepare-zero-vocab", nothing,
     ["data", "prepare", "--corpus", "book.txt", "--tokenizer", "bpe", "--vocab-size", "0",
      "--out", "s2"], "--vocab-size"),
    ("prepare-bad-fraction", nothing,
     ["data", "prepare", "--corpus", "book.txt", "--tokenizer", "char", "--val-fraction", "nan",
      "--out", "s2"], "--val-fraction"),
    ("prepare-huge-seed", nothing,
     ["data", "prepare", "--corpus", "book.txt", "--tokenizer", "char", "--seed", str(2**70),
      "--out", "s2"], "--seed"),
    # --- stores: truncated, flipped, edited, another's tokenizer
    ("store-truncated", lambda r: truncate(r / "store" / "train.arrow"),
     ["data", "info", "store"], "train.arrow"),
    ("store-flipped", lambda r: flip_byte(r / "store" / "train.arrow"),
     ["data", "info", "store"], "store"),
    ("store-vocab-edited-down", lambda r: edit_json(r / "store" / "meta.json", vocab_size=5),
     ["data", "info", "store"], "meta.json"),
    ("store-vocab-edited-up", lambda r: edit_json(r / "store" / "meta.json", vocab_size=200),
     ["data", "info", "store"], "tokenizer"),
    ("store-meta-garbage", lambda r: garbage(r / "store" / "meta.json"),
     ["data", "info", "store"], "meta.json"),
    ("store-other-tokenizer", other_tokenizer, ["data", "info", "store"], "tokenizer"),
    ("train-on-edited-store", lambda r: edit_json(r / "store" / "meta.json", vocab_size=5),
     ["train", "--preset", "tiny", "--store", "store", "--out", "m2", "--tokens", "2K"],
     "meta.json"),
    ("train-not-a-store", nothing,
     ["train", "--preset", "tiny", "--store", "book.txt", "--out", "m2"], "not a token store"),
    # --- evolve: never overwrite a run, bad options, bad resume targets
    ("evolve-over-existing-run", nothing, ["evolve", "--run-dir", "run", *TINY_EVOLVE],
     "--resume run"),
    ("evolve-run-dir-is-a-file", nothing, ["evolve", "--run-dir", "book.txt", *TINY_EVOLVE],
     "not a directory"),
    ("evolve-run-dir-user-folder", user_folder, ["evolve", "--run-dir", "mine", *TINY_EVOLVE],
     "not empty"),
    ("evolve-resume-not-a-run", user_folder, ["evolve", "--resume", "mine", "--no-live"],
     "not a Chimera run"),
    ("evolve-resume-garbage-run-json", lambda r: garbage(r / "run" / "run.json"),
     ["evolve", "--resume", "run", "--in-process", "--no-live"], "run.json"),
    ("evolve-resume-garbage-db", lambda r: garbage(r / "run" / "results.db"),
     ["evolve", "--resume", "run", "--in-process", "--no-live", "--max-candidates", "3"],
     "results.db"),
    ("evolve-missing-corpus", nothing,  # the default runs/<timestamp> is not left behind
     ["evolve", "--corpus", "nope.txt", "--in-process", "--no-live"], "nope.txt"),
    ("evolve-binary-corpus", lambda r: garbage(r / "blob.txt"),
     ["evolve", "--run-dir", "deep/er/r2", "--corpus", "blob.txt", "--in-process", "--no-live"],
     "blob.txt"),
    ("evolve-bad-budget", nothing, ["evolve", "--budget", "soon"], "--budget"),
    ("evolve-zero-budget", nothing, ["evolve", "--budget", "0s"], "--budget"),
    ("evolve-bad-flops", nothing, ["evolve", "--flops", "1e400"], "--flops"),
    ("evolve-huge-seed", nothing, ["evolve", "--seed", str(2**64)], "--seed"),
    ("evolve-negative-seed", nothing, ["evolve", "--data-seed", "-1"], "--data-seed"),
    ("evolve-zero-population", nothing, ["evolve", "--population", "0"], "--population"),
    ("evolve-bad-database-url", nothing,
     ["evolve", "--run-dir", "r2", "--database", "foo://nowhere", *TINY_EVOLVE], "foo://"),
    ("evolve-database-driver-missing", nothing,
     ["evolve", "--run-dir", "r2", "--database", "postgresql://me:secret@127.0.0.1/x",
      *TINY_EVOLVE], "driver"),
    # --- results databases: garbage, text, empty, truncated
    *[(f"{command}-{kind}-db", damage, [command, "run", *extra], "results.db")
      for command, extra in (("leaderboard", []), ("export", ["--parquet", "out.parquet"]),
                             ("plot", []))
      for kind, damage in (("garbage", lambda r: garbage(r / "run" / "results.db")),
                           ("text", lambda r: (r / "run" / "results.db").write_text("hello\n")),
                           ("empty", lambda r: (r / "run" / "results.db").write_bytes(b"")),
                           ("truncated", truncated_results_db))],
    ("leaderboard-missing-run", nothing, ["leaderboard", "nowhere"], "nowhere"),
    # --- model directories: corrupted weights and configs, the wrong tokenizer, sampling
    ("generate-not-a-model", nothing, ["generate", "store", "--prompt", "hi"], "config.json"),
    ("generate-truncated-weights", lambda r: truncate(r / "model" / "model.safetensors"),
     ["generate", "model", "--prompt", "The fox"], "model.safetensors"),
    ("generate-flipped-header", lambda r: flip_byte(r / "model" / "model.safetensors", 3),
     ["generate", "model", "--prompt", "The fox"], "model.safetensors"),
    ("generate-garbage-config", lambda r: garbage(r / "model" / "config.json"),
     ["generate", "model", "--prompt", "The fox"], "config.json"),
    ("generate-edited-config", lambda r: edit_json(r / "model" / "config.json", d_model=48),
     ["generate", "model", "--prompt", "The fox"], "model.safetensors"),
    ("generate-smaller-tokenizer", smaller_tokenizer,
     ["generate", "model", "--prompt", "abc"], "tokenizer"),
    ("generate-nan-temperature", nothing,
     ["generate", "model", "--prompt", "The fox", "--temperature", "nan"], "--temperature"),
    ("generate-tiny-temperature", nothing,
     ["generate", "model", "--prompt", "The fox", "--temperature", "1e-300"], "temperature"),
    ("generate-huge-seed", nothing,
     ["generate", "model", "--prompt", "The fox", "--seed", str(2**64)], "--seed"),
    # --- fine-tuning data
    ("sft-binary-data", lambda r: garbage(r / "chats.jsonl"),
     ["sft", "model", "--data", "chats.jsonl", "--out", "m2"], "chats.jsonl"),
    ("sft-garbage-line", lambda r: (r / "chats.jsonl").write_text("{not json\n"),
     ["sft", "model", "--data", "chats.jsonl", "--out", "m2"], "chats.jsonl:1"),
    ("sft-no-assistant-turn", lambda r: (r / "chats.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "hello"}]}) + "\n"),
     ["sft", "model", "--data", "chats.jsonl", "--out", "m2"], "no assistant turn"),
    # --- serving
    ("serve-port-too-large", nothing, ["serve", "model", "--port", "99999"], "--port"),
    ("serve-port-negative", nothing, ["serve", "model", "--port", "-1"], "--port"),
    ("serve-zero-messages", nothing, ["serve", "model", "--max-messages", "0"],
     "--max-messages"),
    # --- promote
    ("promote-not-a-run", user_folder, ["promote", "mine"], "mine"),
]


def run_cli(argv, capsys) -> tuple[int, str]:
    """``main(argv)`` as the console script runs it: its exit status and its stderr. Any
    exception that escapes is the traceback a user would see, and fails the test."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("damage,argv,message", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(world, tmp_path, monkeypatch, capsys,
                                                         damage, argv, message):
    root = tmp_path / "user"
    shutil.copytree(world, root)
    damage(root)
    before = checksum(root)
    monkeypatch.chdir(root)
    status, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert lines and message in lines[-1], err
    if not lines[0].startswith("usage:"):  # argparse's errors come after its usage lines
        assert len(lines) == 1, err
    assert "weights_only=False" not in err  # never the advice to unpickle
    assert checksum(root) == before, "the command changed the user's files"


def test_the_sweep_covers_every_subcommand():
    commands = {case[2][0] for case in CASES}
    assert commands >= {"data", "train", "evolve", "leaderboard", "export", "plot", "generate",
                        "sft", "serve", "promote"}


def test_a_run_is_resumed_by_one_process_at_a_time(world, tmp_path, monkeypatch, capsys):
    from cluster.app.rundir import exclusive_run

    root = tmp_path / "user"
    shutil.copytree(world, root)
    monkeypatch.chdir(root)
    before = checksum(root)
    with exclusive_run(root / "run"):  # as a `chimera evolve --resume run` still running
        status, err = run_cli(["evolve", "--resume", "run", "--in-process", "--no-live"],
                              capsys)
    assert status == 2 and "another chimera evolve is running this run" in err
    assert checksum(root) == before
