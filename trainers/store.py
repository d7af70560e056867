"""The shared Arrow token store: a tokenized corpus that many workers read at once.

A store is a directory::

    meta.json               schema version, fingerprints, counts, checksums (human-readable)
    train.arrow, val.arrow  Arrow IPC files, one column ``tokens`` (smallest unsigned int type
                            that holds the vocabulary), one record batch: one contiguous buffer
    train_docs.arrow, ...   document start offsets into the token stream (int64, n_docs + 1)
    tokenizer/              the tokenizer that made it (transformers format)

Documents are packed into one stream per split, each followed by the end-of-text token. The
train/validation split is by document, drawn from a seed. Writes go to a temporary directory that
is renamed into place when complete. Readers memory-map the files: the numpy views share the OS
page cache, so N readers on a machine hold one copy. Opening validates the schema, the sizes and
a checksum, and refuses a store made by another tokenizer than the one expected.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from chimera.tokenizer import (
    TokenizerError,
    end_of_text_id,
    fingerprint,
    load_tokenizer,
    train_bpe,
    train_char,
)
from trainers.corpus import CorpusSpec, corpus_fingerprint, iter_documents

SCHEMA_VERSION = 1
DEFAULT_VOCAB_SIZE = 1024  # of a BPE trained on the corpus (CPU-sized models)
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


class StoreError(ValueError):
    """A store that cannot be built, or a directory that is not a valid store."""


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.05  # share of documents held out for validation
    seed: int = 0  # which documents are held out

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise StoreError(f"val_fraction={self.val_fraction}: must be in (0, 1)")


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    documents: int
    bytes: int  # UTF-8 bytes of the documents' text: the denominator of bits per byte
    checksum: str  # sha256 of the token buffer

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens


def token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise StoreError(f"vocab_size={vocab_size} does not fit in 32 bits")


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()[:32]


# ---------------------------------------------------------------------------------- writing
def _tokenize(spec: CorpusSpec, tokenizer, dtype: np.dtype, batch_docs: int,
              progress: Callable[[int], None] | None):
    """All documents in order: one token stream, per-document token counts and byte counts."""
    eot = end_of_text_id(tokenizer)
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets needed
    chunks, lengths, sizes = [], [], []

    def flush(batch: list[str]) -> None:
        for encoding in encode(batch, add_special_tokens=False):
            ids = np.asarray(encoding.ids, dtype=dtype)
            chunks.append(ids)
            chunks.append(np.array([eot], dtype=dtype))
            lengths.append(len(ids) + 1)
        batch_bytes = [len(text.encode()) for text in batch]
        sizes.extend(batch_bytes)
        if progress:
            progress(sum(batch_bytes))

    batch: list[str] = []
    for doc in iter_documents(spec):
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return (np.concatenate(chunks), np.asarray(lengths, dtype=np.int64),
            np.asarray(sizes, dtype=np.int64))


def _held_out(n_docs: int, split: SplitConfig) -> np.ndarray:
    """Which documents go to validation: a seeded draw per document, at least one each way."""
    if n_docs < 2:
        raise StoreError(f"the corpus has {n_docs} document; a train/validation split needs at "
                         f"least 2 (check the document separator)")
    draws = np.random.default_rng(split.seed).random(n_docs)
    held = draws < split.val_fraction
    if not held.any():  # too few documents for the fraction: hold out the lowest draw
        held[np.argmin(draws)] = True
    if held.all():
        held[np.argmax(draws)] = False
    return held


def _write_table(path: Path, name: str, array: np.ndarray, metadata: dict[str, str]) -> None:
    table = pa.table({name: pa.array(array)}, metadata=metadata)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(array)))  # one batch: one buffer


def saved_tokenizer(out: str | Path, spec: CorpusSpec, recipe: str):
    """The tokenizer saved in an existing store at ``out`` if it was trained by ``recipe``
    (e.g. 'bpe:4096') on this very corpus, so preparing again need not retrain it; else None."""
    meta_path = Path(out) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("tokenizer_recipe") != recipe or \
            meta.get("corpus_fingerprint") != corpus_fingerprint(spec):
        return None
    try:
        return load_tokenizer(Path(out) / TOKENIZER_DIR)
    except TokenizerError:
        return None


def tokenizer_recipe(tokenizer: str, vocab_size: int) -> str | None:
    """'bpe' and 'char' name tokenizers trained on the corpus; anything else is a directory."""
    return {"bpe": f"bpe:{vocab_size}", "char": "char"}.get(tokenizer)


def tokenizer_for(spec: CorpusSpec, tokenizer: str, vocab_size: int, out: str | Path):
    """The tokenizer a store at ``out`` should use: a directory is loaded; 'bpe' / 'char' are
    trained on the corpus, unless the store there already holds one made the same way."""
    check_store_target(out)  # before hours of tokenizer training, not after
    recipe = tokenizer_recipe(tokenizer, vocab_size)
    if recipe is None:
        return load_tokenizer(tokenizer)
    saved = saved_tokenizer(out, spec, recipe)
    if saved is not None:
        return saved
    documents = iter_documents(spec)
    return train_bpe(documents, vocab_size) if tokenizer == "bpe" else train_char(documents)


def prepare_store(spec: CorpusSpec, tokenizer, out: str | Path,
                  split: SplitConfig = SplitConfig(), batch_docs: int = 512,
                  progress: Callable[[int], None] | None = None,
                  tokenizer_recipe: str | None = None) -> tuple[TokenStore, bool]:
    """Tokenize ``spec`` into a store at ``out``. Returns (store, reused): when ``out`` already
    holds a valid store of the same corpus, tokenizer and split, it is opened, not rebuilt.
    ``tokenizer_recipe`` records how a trained tokenizer was made (see ``saved_tokenizer``)."""
    out = Path(out).resolve()  # '.' and 'a/..' have no name to build a sibling from
    check_store_target(out)
    corpus_fp, tokenizer_fp = corpus_fingerprint(spec), fingerprint(tokenizer)
    if (out / META_FILE).is_file():
        try:
            existing = TokenStore.open(out, expected_tokenizer=tokenizer_fp)
        except StoreError:
            existing = None  # damaged or different: rebuild it below
        if existing is not None and existing.meta["corpus_fingerprint"] == corpus_fp \
                and existing.meta["split"] == asdict(split):
            return existing, True

    dtype = token_dtype(len(tokenizer))
    stream, lengths, sizes = _tokenize(spec, tokenizer, dtype, batch_docs, progress)
    held = _held_out(len(lengths), split)
    token_is_held = np.repeat(held, lengths)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out, "tmp"), dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the store is meant to be shared
    try:
        splits: dict[str, dict] = {}
        for name, mask_docs, mask_tokens in (("train", ~held, ~token_is_held),
                                             ("val", held, token_is_held)):
            tokens = stream[mask_tokens]
            offsets = np.concatenate([[0], np.cumsum(lengths[mask_docs])]).astype(np.int64)
            info = SplitInfo(tokens=len(tokens), documents=int(mask_docs.sum()),
                             bytes=int(sizes[mask_docs].sum()), checksum=_checksum(tokens))
            _write_table(tmp / f"{name}.arrow", "tokens", tokens, {"split": name})
            _write_table(tmp / f"{name}_docs.arrow", "offsets", offsets, {"split": name})
            splits[name] = asdict(info)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        meta = {"schema_version": SCHEMA_VERSION, "corpus": spec.describe(),
                "corpus_fingerprint": corpus_fp, "tokenizer_fingerprint": tokenizer_fp,
                "tokenizer_recipe": tokenizer_recipe,
                "vocab_size": len(tokenizer), "token_dtype": dtype.name,
                "end_of_text_id": end_of_text_id(tokenizer), "split": asdict(split),
                "splits": splits}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.open(out, expected_tokenizer=tokenizer_fp), False


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished directory into place; an old store is moved aside first, then deleted
    (``check_store_target`` has made sure that it is one)."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target, "old"), dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, target)


# What a store directory holds; anything else in a directory means it is not (only) a store.
STORE_ENTRIES = frozenset({META_FILE, TOKENIZER_DIR, *(f"{name}{suffix}.arrow" for name in SPLITS
                                                       for suffix in ("", "_docs"))})


def check_store_target(out: str | Path) -> None:
    """Refuse to build a store at ``out`` unless that replaces nothing but a store: ``out`` may
    be missing, an empty directory, or a directory holding a store's files and nothing else.
    A folder of the user's files, a plain file or the current directory is never replaced."""
    out = Path(out).resolve()
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"{out}: exists and is not a directory; choose another output "
                         f"directory for the store")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise StoreError(f"{out}: is the current directory (or holds it); choose a new "
                         f"directory for the store, e.g. {out / 'store'}")
    entries = {entry.name for entry in out.iterdir()}
    if not entries:
        return
    if META_FILE not in entries or not entries <= STORE_ENTRIES:
        others = sorted(entries - STORE_ENTRIES)[:3]
        raise StoreError(f"{out}: not empty and not a token store (holds "
                         f"{', '.join(others) or 'no ' + META_FILE}); refusing to replace it: "
                         f"choose a new or empty directory")


def _scratch_prefix(target: Path, kind: str) -> str:
    """Name of the scratch directories beside ``target`` (``kind``: tmp, a build in progress;
    old, a replaced store being deleted), with the host and process that own them, so a later
    build can tell an abandoned one (its process is gone) from one that is still running."""
    return f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _remove_abandoned(target: Path) -> None:
    """Delete scratch directories beside ``target`` left by builds that were killed: made on
    this host by a process that no longer exists. Others' (another host's, a live process's)
    are left alone."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            owner = path.name[len(f".{target.name}.{kind}-"):].rsplit("-", 2)
            if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
                continue
            if not _process_alive(int(owner[1])):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------------------------- reading
def _map_column(path: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """Zero-copy numpy view of the single column of a one-batch Arrow IPC file."""
    if not path.is_file():
        raise StoreError(f"{path}: missing; the store is incomplete")
    try:
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        if schema.names != [name] or schema.field(name).type != pa.from_numpy_dtype(dtype):
            raise StoreError(f"{path}: unexpected schema {schema}; expected one column "
                             f"{name!r} of {dtype}")
        if reader.num_record_batches != 1:
            raise StoreError(f"{path}: {reader.num_record_batches} record batches; expected 1")
        column = reader.get_batch(0).column(0)
        return column.to_numpy(zero_copy_only=True)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise StoreError(f"{path}: corrupted or truncated Arrow file: {err}") from None


class TokenStore:
    """A read-only, memory-mapped token store. Cheap to open in every worker."""

    def __init__(self, root: Path, meta: dict, tokens: dict[str, np.ndarray],
                 offsets: dict[str, np.ndarray]) -> None:
        self.root, self.meta = root, meta
        self._tokens, self._offsets = tokens, offsets

    @classmethod
    def open(cls, root: str | Path, expected_tokenizer: str | None = None,
             verify: bool = True) -> TokenStore:
        """Open and validate. ``expected_tokenizer``: a tokenizer fingerprint the store must
        have been made with. ``verify``: check the token checksums (reads every page once)."""
        root = Path(root)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise StoreError(f"{root}: not a token store (no {META_FILE}); build one with "
                             f"`chimera data prepare`")
        try:
            meta = json.loads(meta_path.read_text())
            version, dtype = meta["schema_version"], np.dtype(meta["token_dtype"])
            split_infos = {name: SplitInfo(**meta["splits"][name]) for name in SPLITS}
            vocab_size = meta["vocab_size"]
            if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
                    or not 2 <= vocab_size <= np.iinfo(dtype).max + 1:
                raise ValueError(f"vocab_size {vocab_size!r} does not fit token_dtype {dtype}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                ValueError) as err:
            raise StoreError(f"{meta_path}: unreadable store metadata: {err}") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{root}: store schema version {version}, this Chimera reads "
                             f"{SCHEMA_VERSION}; prepare the store again")
        if expected_tokenizer is not None and meta["tokenizer_fingerprint"] != expected_tokenizer:
            raise StoreError(f"{root}: made with another tokenizer (fingerprint "
                             f"{meta['tokenizer_fingerprint']}, expected {expected_tokenizer}); "
                             f"prepare a store with this tokenizer")
        tokens, offsets = {}, {}
        for name, info in split_infos.items():
            tokens[name] = _map_column(root / f"{name}.arrow", "tokens", dtype)
            offsets[name] = _map_column(root / f"{name}_docs.arrow", "offsets", np.dtype(np.int64))
            if len(tokens[name]) != info.tokens or len(offsets[name]) != info.documents + 1 \
                    or offsets[name][-1] != info.tokens:
                raise StoreError(f"{root}: {name} split has {len(tokens[name])} tokens and "
                                 f"{len(offsets[name]) - 1} documents, metadata says "
                                 f"{info.tokens} and {info.documents}: the store is damaged")
            if verify and _checksum(tokens[name]) != info.checksum:
                raise StoreError(f"{root}: {name} split fails its checksum: the store is "
                                 f"corrupted; prepare it again")
            if verify and len(tokens[name]) and int(tokens[name].max()) >= vocab_size:
                raise StoreError(f"{meta_path}: vocab_size {vocab_size}, but the {name} split "
                                 f"holds token {int(tokens[name].max())}: the metadata was "
                                 f"edited or the store is damaged; prepare it again")
        return cls(root, meta, tokens, offsets)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer that is not the one this store's tokens were made with."""
        if len(tokenizer) != self.vocab_size or fingerprint(tokenizer) != \
                self.meta["tokenizer_fingerprint"]:
            raise StoreError(f"{self.root}: the tokenizer ({len(tokenizer)} tokens, fingerprint "
                             f"{fingerprint(tokenizer)}) is not the one the store was made "
                             f"with ({self.vocab_size} tokens, fingerprint "
                             f"{self.meta['tokenizer_fingerprint']}); prepare the store again")

    def load_tokenizer(self):
        """The store's own tokenizer, checked against the store."""
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.check_tokenizer(tokenizer)
        return tokenizer

    # --------------------------------------------------------------------- facts
    def info(self, split: str) -> SplitInfo:
        return SplitInfo(**self.meta["splits"][self._check(split)])

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_DIR

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream: a read-only view of the memory-mapped file."""
        return self._tokens[self._check(split)]

    def document_offsets(self, split: str) -> np.ndarray:
        return self._offsets[self._check(split)]

    def document_text(self, split: str, index: int, tokenizer) -> str:
        """Document ``index`` of the split: its tokens, less the end-of-text token, decoded.
        That is its text exactly for the byte-level BPE and character tokenizers stores train."""
        offsets = self.document_offsets(split)
        ids = self.tokens(split)[offsets[index]:offsets[index + 1] - 1]
        return tokenizer.decode(ids.tolist(), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def bits_per_byte(self, loss_nats_per_token: float, split: str = "val") -> float:
        """Convert a mean loss in nats per token into bits per byte of this split's text."""
        info = self.info(split)
        return loss_nats_per_token / math.log(2) * info.tokens / info.bytes

    def _check(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return split

    # --------------------------------------------------------------------- batches
    def _windows(self, split: str, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        stream = self.tokens(split)
        index = starts[:, None] + np.arange(seq_len + 1)
        return torch.from_numpy(stream[index].astype(np.int64))

    def _max_start(self, split: str, seq_len: int) -> int:
        available = len(self.tokens(split)) - (seq_len + 1)
        if available < 0:
            raise StoreError(f"the {split} split holds {len(self.tokens(split))} tokens, fewer "
                             f"than one window of seq_len + 1 = {seq_len + 1}; use a shorter "
                             f"sequence, a larger corpus or a larger validation fraction")
        return available

    def sample(self, split: str, batch_size: int, seq_len: int, seed: int, step: int
               ) -> torch.Tensor:
        """Packed (batch_size, seq_len + 1) windows at random offsets: a pure function of
        (seed, step), so a run can resume at any step and get the same batches."""
        high = self._max_start(split, seq_len) + 1
        rng = np.random.default_rng((seed, step))
        return self._windows(split, rng.integers(0, high, size=batch_size), seq_len)

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0
                ) -> Iterator[torch.Tensor]:
        step = start_step
        while True:
            yield self.sample(split, batch_size, seq_len, seed, step)
            step += 1

    def validation_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None
                           ) -> list[torch.Tensor]:
        """The fixed validation set: consecutive non-overlapping windows from the start of the
        validation split, identical for every candidate scored on this store."""
        self._max_start("val", seq_len)
        n_windows = (len(self.tokens("val")) - 1) // seq_len
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        starts = np.arange(n_windows) * seq_len
        return [self._windows("val", starts[i:i + batch_size], seq_len)
                for i in range(0, n_windows, batch_size)]
