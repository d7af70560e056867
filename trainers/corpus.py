"""Corpus sources: where documents come from.

A ``CorpusSpec`` names a source and how to read it; ``iter_documents`` yields its documents as
strings and ``corpus_fingerprint`` hashes everything that decides them (file contents included),
so a token store built from it can be reused exactly when nothing changed.

Sources: plain text files or folders (documents split on ``<|endoftext|>`` lines or on blank
lines), JSONL (a text field), Parquet (a text column), Hugging Face datasets by name when the
``datasets`` package can reach or has cached them, and the built-in story generator.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainers.stories import GENERATOR_VERSION, stories_of_size

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
END_OF_TEXT_LINE = "<|endoftext|>"
STORIES = "stories"
HF_PREFIX = "hf:"


class CorpusError(ValueError):
    """A corpus that cannot be read as asked; the message says which file and why."""


class CorpusFormat(str, enum.Enum):
    AUTO = "auto"  # by file suffix; "stories" and "hf:NAME" name themselves
    TEXT = "text"
    JSONL = "jsonl"
    PARQUET = "parquet"


class Separator(str, enum.Enum):
    END_OF_TEXT = "eot"  # a line holding only <|endoftext|> ends a document
    BLANK_LINE = "blank"  # one or more blank lines end a document


class DecodeErrors(str, enum.Enum):
    STRICT = "strict"  # undecodable bytes are an error naming the file and byte offset
    REPLACE = "replace"  # replaced with U+FFFD


@dataclass(frozen=True)
class CorpusSpec:
    source: str  # a path, "stories", or "hf:NAME[:CONFIG]"
    format: CorpusFormat = CorpusFormat.AUTO
    text_field: str = "text"  # JSONL field / Parquet column / HF column
    separator: Separator = Separator.END_OF_TEXT
    errors: DecodeErrors = DecodeErrors.STRICT
    clean_wikitext: bool = False
    stories_bytes: int = 2_000_000  # size of the built-in story corpus
    seed: int = 0  # the built-in story corpus's seed
    hf_split: str = "train"

    def describe(self) -> str:
        if self.source == STORIES:
            return f"built-in stories ({self.stories_bytes:,} bytes, seed {self.seed})"
        return self.source


# ---------------------------------------------------------------------------------- cleaning
_WIKI_HEADING = re.compile(r"^[ \t]*(?:=[ \t]*)+(.*?)(?:[ \t]*=)+[ \t]*$", re.MULTILINE)
_WIKI_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def clean_wikitext(text: str) -> str:
    """Undo WikiText markup: ``1 @,@ 000`` -> ``1,000``, ``= = Title = =`` -> ``Title``."""
    for marker, joined in _WIKI_JOINERS.items():
        text = text.replace(marker, joined)
    return _WIKI_HEADING.sub(lambda m: m.group(1), text)


# ---------------------------------------------------------------------------------- files
def _decode(data: bytes, path: Path, errors: DecodeErrors, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8", errors=errors.value)
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: bytes that are not valid UTF-8 at byte offset {base_offset + err.start}; "
            f"fix the file or pass --errors replace to replace them") from None


def _split_documents(text: str, separator: Separator) -> Iterator[str]:
    if separator is Separator.END_OF_TEXT:
        parts = re.split(r"^[ \t]*<\|endoftext\|>[ \t]*$", text, flags=re.MULTILINE)
    else:
        parts = re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text)
    for part in parts:
        part = part.strip()
        if part:
            yield part


def _text_documents(path: Path, spec: CorpusSpec) -> Iterator[str]:
    yield from _split_documents(_decode(path.read_bytes(), path, spec.errors), spec.separator)


def _jsonl_documents(path: Path, spec: CorpusSpec) -> Iterator[str]:
    offset = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, spec.errors, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{line_number}: invalid JSON: {err.msg}") from None
            if not isinstance(record, dict) or spec.text_field not in record:
                raise CorpusError(f"{path}:{line_number}: no field {spec.text_field!r} (choose "
                                  f"the text field with --text-field)")
            text = record[spec.text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{line_number}: field {spec.text_field!r} is "
                                  f"{type(text).__name__}, not text")
            if text.strip():
                yield text.strip()


def _parquet_documents(path: Path, spec: CorpusSpec) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file: {err}") from None
    columns = parquet.schema_arrow.names
    if spec.text_field not in columns:
        raise CorpusError(f"{path}: no column {spec.text_field!r}; columns are "
                          f"{', '.join(columns)} (choose one with --text-field)")
    for batch in parquet.iter_batches(columns=[spec.text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text.strip()


_READERS = {CorpusFormat.TEXT: _text_documents, CorpusFormat.JSONL: _jsonl_documents,
            CorpusFormat.PARQUET: _parquet_documents}


def _format_of(path: Path, spec: CorpusSpec) -> CorpusFormat | None:
    if spec.format is not CorpusFormat.AUTO:
        return spec.format
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return CorpusFormat.JSONL
    if suffix in PARQUET_SUFFIXES:
        return CorpusFormat.PARQUET
    if suffix in TEXT_SUFFIXES or suffix == "":
        return CorpusFormat.TEXT
    return None


def corpus_files(spec: CorpusSpec) -> list[tuple[Path, CorpusFormat]]:
    """The files of a path source, in a stable order, with the format each is read as."""
    root = Path(spec.source)
    if not root.exists():
        raise CorpusError(f"{root}: no such file or directory")
    if root.is_file():
        fmt = _format_of(root, spec) or CorpusFormat.TEXT
        return [(root, fmt)]
    files = [(p, _format_of(p, spec)) for p in sorted(root.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files = [(p, fmt) for p, fmt in files if fmt is not None]
    if not files:
        raise CorpusError(f"{root}: no corpus files (.txt, .md, .jsonl, .parquet) in the folder")
    return files


# ---------------------------------------------------------------------------------- hub
def _hf_dataset(spec: CorpusSpec):
    try:
        import datasets
    except ImportError:
        raise CorpusError("Hugging Face datasets need the `datasets` package "
                          "(pip install datasets); local files work without it") from None
    name, _, config = spec.source[len(HF_PREFIX):].partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=spec.hf_split)
    except Exception as err:  # the hub raises many kinds; all mean "not available here"
        raise CorpusError(f"Hugging Face dataset {name!r} is not reachable or cached: "
                          f"{type(err).__name__}: {err}") from None


def _hf_documents(spec: CorpusSpec) -> Iterator[str]:
    dataset = _hf_dataset(spec)
    if spec.text_field not in dataset.column_names:
        raise CorpusError(f"{spec.source}: no column {spec.text_field!r}; columns are "
                          f"{', '.join(dataset.column_names)}")
    for text in dataset[spec.text_field]:
        if isinstance(text, str) and text.strip():
            yield text.strip()


# ---------------------------------------------------------------------------------- public
def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """The corpus's documents, in a stable order, cleaned as asked."""
    if spec.source == STORIES:
        documents: Iterator[str] = (s.text for s in stories_of_size(spec.stories_bytes, spec.seed))
    elif spec.source.startswith(HF_PREFIX):
        documents = _hf_documents(spec)
    else:
        documents = (doc for path, fmt in corpus_files(spec) for doc in _READERS[fmt](path, spec))
    found = False
    for doc in documents:
        found = True
        yield clean_wikitext(doc) if spec.clean_wikitext else doc
    if not found:
        raise CorpusError(f"{spec.describe()}: the corpus is empty (no non-blank documents)")


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """A hash of the reading options and of every input byte."""
    digest = hashlib.sha256()
    options = (spec.format.value, spec.text_field, spec.separator.value, spec.errors.value,
               spec.clean_wikitext)
    digest.update(repr(options).encode())
    if spec.source == STORIES:
        digest.update(f"stories:{GENERATOR_VERSION}:{spec.seed}:{spec.stories_bytes}".encode())
    elif spec.source.startswith(HF_PREFIX):
        dataset = _hf_dataset(spec)
        digest.update(f"{spec.source}:{spec.hf_split}:{getattr(dataset, '_fingerprint', '')}"
                      .encode())
    else:
        root = Path(spec.source)
        for path, fmt in corpus_files(spec):
            digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}:{fmt.value}"
                          .encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]
