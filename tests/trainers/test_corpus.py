"""Corpus sources and their errors."""

import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.corpus import (
    CorpusError,
    CorpusFormat,
    CorpusSpec,
    DecodeErrors,
    Separator,
    clean_wikitext,
    corpus_fingerprint,
    iter_documents,
)


def test_text_file_split_on_end_of_text_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nline two\n<|endoftext|>\nsecond doc\n  <|endoftext|>  \n\n")
    assert list(iter_documents(CorpusSpec(str(path)))) == ["first doc\nline two", "second doc"]


def test_text_file_split_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b\nc\n\n\n   \nd e\n\nf\n")
    spec = CorpusSpec(str(path), separator=Separator.BLANK_LINE)
    assert list(iter_documents(spec)) == ["a b\nc", "d e", "f"]


def test_folder_reads_every_corpus_file_in_a_stable_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "b" / "c.md").write_text("from c")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "from d"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert list(iter_documents(CorpusSpec(str(tmp_path)))) == ["from a", "from c", "from d"]


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"body": "one", "id": 1}, {"body": "two"}]))
    assert list(iter_documents(CorpusSpec(str(path), text_field="body"))) == ["one", "two"]
    with pytest.raises(CorpusError, match=r"c.jsonl:1: no field 'text'"):
        list(iter_documents(CorpusSpec(str(path))))
    path.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: invalid JSON"):
        list(iter_documents(CorpusSpec(str(path))))


def test_parquet_reads_the_text_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta", None, " "], "n": [1, 2, 3, 4]}), path)
    assert list(iter_documents(CorpusSpec(str(path), text_field="content"))) == ["alpha", "beta"]
    with pytest.raises(CorpusError, match="no column 'text'; columns are content, n"):
        list(iter_documents(CorpusSpec(str(path))))


def test_hugging_face_datasets_by_name(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return ["hub doc one", "hub doc two"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(iter_documents(CorpusSpec("hf:roneneldan/TinyStories:default")))
    assert docs == ["hub doc one", "hub doc two"]
    assert calls == [("roneneldan/TinyStories", "default", "train")]


def test_unreachable_hugging_face_dataset_is_a_clear_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CorpusError, match="not reachable or cached: ConnectionError"):
        list(iter_documents(CorpusSpec("hf:some/dataset")))


def test_built_in_stories_source():
    docs = list(iter_documents(CorpusSpec("stories", stories_bytes=5000, seed=2)))
    assert 5 < len(docs) < 30 and all("named" in d for d in docs)


def test_missing_path_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        list(iter_documents(CorpusSpec(str(tmp_path / "absent.txt"))))
    (tmp_path / "empty.txt").write_text("\n\n<|endoftext|>\n  \n")
    with pytest.raises(CorpusError, match="the corpus is empty"):
        list(iter_documents(CorpusSpec(str(tmp_path / "empty.txt"))))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match="no corpus files"):
        list(iter_documents(CorpusSpec(str(tmp_path / "folder"))))


def test_undecodable_bytes_name_the_file_and_offset_or_are_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\n" + b"caf\xff more")
    with pytest.raises(CorpusError, match=r"bad.txt: .*byte offset 13.*--errors replace"):
        list(iter_documents(CorpusSpec(str(path))))
    docs = list(iter_documents(CorpusSpec(str(path), errors=DecodeErrors.REPLACE)))
    assert docs == ["good text\ncaf\ufffd more"]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "x\xfe"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl: .*byte offset 26"):
        list(iter_documents(CorpusSpec(str(jsonl))))


def test_wikitext_cleaning():
    raw = " = = Early life = = \nHe was born in 1 @,@ 000 @-@ year @.@ 5 town ."
    assert clean_wikitext(raw) == "Early life\nHe was born in 1,000-year.5 town ."


def test_fingerprint_follows_content_and_options(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\n<|endoftext|>\ntwo")
    base = corpus_fingerprint(CorpusSpec(str(path)))
    assert base == corpus_fingerprint(CorpusSpec(str(path)))
    assert base != corpus_fingerprint(CorpusSpec(str(path), separator=Separator.BLANK_LINE))
    path.write_text("one\n<|endoftext|>\ntwo!")
    assert base != corpus_fingerprint(CorpusSpec(str(path)))
    assert corpus_fingerprint(CorpusSpec("stories", seed=1)) != \
        corpus_fingerprint(CorpusSpec("stories", seed=2))
    assert CorpusSpec(str(path), format=CorpusFormat.TEXT).format is CorpusFormat.TEXT
