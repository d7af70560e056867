"""`chimera data`: prepare, reuse, info, stories, and bad input with clean exits."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from cluster.cli.argtypes import parse_size
from trainers.store import TokenStore


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog "
                                f"{i % 7} times." for i in range(60)))
    return path


def _prepare(corpus, out, *extra):
    return main(["data", "prepare", "--corpus", str(corpus), "--separator", "blank",
                 "--out", str(out), *extra])


def test_prepare_then_prepare_again_reuses(corpus, tmp_path, capsys):
    out = tmp_path / "store"
    assert _prepare(corpus, out, "--tokenizer", "bpe", "--vocab-size", "300") == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert _prepare(corpus, out, "--tokenizer", "bpe", "--vocab-size", "300") == 0
    assert "reused the existing store" in capsys.readouterr().out
    store = TokenStore.open(out)
    assert store.vocab_size == 300 and store.info("train").documents + \
        store.info("val").documents == 60
    assert main(["data", "info", str(out)]) == 0
    assert "bytes/token" in capsys.readouterr().out


def test_prepare_with_an_existing_tokenizer_directory(corpus, tmp_path, capsys):
    assert _prepare(corpus, tmp_path / "a", "--tokenizer", "char") == 0
    assert _prepare(corpus, tmp_path / "b", "--tokenizer", str(tmp_path / "a" / "tokenizer")) == 0
    assert TokenStore.open(tmp_path / "a").meta["tokenizer_fingerprint"] == \
        TokenStore.open(tmp_path / "b").meta["tokenizer_fingerprint"]


@pytest.mark.parametrize("args,message", [
    (["--corpus", "/does/not/exist", "--tokenizer", "char"], "no such file or directory"),
    (["--tokenizer", "bpe", "--vocab-size", "100000"], "supports only"),
    (["--tokenizer", "/no/tokenizer"], "no such tokenizer directory"),
    (["--tokenizer", "char", "--val-fraction", "1.5"], "val_fraction"),
])
def test_bad_input_exits_2_with_one_clear_line(corpus, tmp_path, capsys, args, message):
    argv = ["data", "prepare", "--corpus", str(corpus), "--separator", "blank",
            "--out", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_undecodable_corpus_names_file_and_offset_from_the_command_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\n\xc3\x28 broken")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "data", "prepare", "--corpus",
                             str(bad), "--tokenizer", "char", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "bad.txt" in result.stderr and "byte offset 6" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_info_on_a_damaged_store_exits_2(corpus, tmp_path, capsys):
    _prepare(corpus, tmp_path / "s", "--tokenizer", "char")
    (tmp_path / "s" / "val.arrow").write_bytes(b"garbage")
    assert main(["data", "info", str(tmp_path / "s")]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err


def test_stories_command_writes_stories_with_facts(tmp_path):
    out = tmp_path / "stories.jsonl"
    assert main(["data", "stories", "--out", str(out), "--size", "5KB", "--seed", "4"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) >= 5 and all(r["facts"]["hero"] in r["text"] for r in records)


def test_sizes_parse():
    assert parse_size("5MB") == 5_000_000 and parse_size("500KB") == 500_000
    assert parse_size("1.5G") == 1_500_000_000 and parse_size("1234") == 1234
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
