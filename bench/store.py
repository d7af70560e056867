"""Token store benchmark on tinyshakespeare: tokenization throughput and shared-memory readers.

1. Tokenization throughput (MB/s of UTF-8 text) with the `tokenizers` batch path (what
   `chimera data prepare` uses: Rust threads over batches of documents) against encoding one
   document at a time, interleaved in one run; plus `prepare_store` end to end.
2. Resident memory of readers: 1 vs 4 processes sampling from one store at the same time. Each
   reader reports its private (unshared) memory growth from before opening the store to after
   sampling, read from /proc/self/smaps_rollup. Pages of the memory-mapped store are shared
   page cache, so an extra reader should add almost nothing (target: < 10% of the store's size).
   A copying reader (reads the file into its own memory) is shown for contrast. The store for
   this part is tinyshakespeare repeated 40 times so that its size dwarfs allocator noise.

    python bench/store.py
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from chimera.tokenizer import train_bpe
from trainers.corpus import CorpusSpec, Separator, iter_documents
from trainers.store import TokenStore, prepare_store

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"


def private_bytes() -> int:
    """Private (unshared) resident memory of this process: Private_Clean + Private_Dirty."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def reader(store_dir: str, copy: bool, barrier, results, index: int) -> None:
    before = private_bytes()
    if copy:  # a naive reader: the whole token file read into this process's memory
        tokens = np.frombuffer((Path(store_dir) / "train.arrow").read_bytes(), dtype=np.uint8)
        checksum = int(tokens[::4096].sum())
    else:
        store = TokenStore.open(store_dir)  # verifies the checksum: touches every page
        for step in range(200):
            store.sample("train", 16, 256, seed=index, step=step)
        checksum = int(store.tokens("train")[::4096].sum())
    barrier.wait()  # all readers hold the store at once when they measure
    results[index] = (private_bytes() - before, checksum)
    barrier.wait()


def reader_growth(store_dir: Path, n_readers: int, copy: bool) -> list[int]:
    ctx = mp.get_context("spawn")
    barrier, manager = ctx.Barrier(n_readers), ctx.Manager()
    results = manager.dict()
    procs = [ctx.Process(target=reader, args=(str(store_dir), copy, barrier, results, i))
             for i in range(n_readers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [results[i][0] for i in range(n_readers)]


def bench_tokenization(docs: list[str], tokenizer, repeats: int) -> dict[str, float]:
    backend = tokenizer.backend_tokenizer
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    n_bytes = sum(len(d.encode()) for d in docs)

    def batched():
        for i in range(0, len(docs), 512):
            encode_batch(docs[i:i + 512], add_special_tokens=False)

    def one_at_a_time():
        for doc in docs:
            backend.encode(doc, add_special_tokens=False)

    times: dict[str, list[float]] = {"batch": [], "single": []}
    for _ in range(repeats):
        for name, fn in (("batch", batched), ("single", one_at_a_time)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: n_bytes / statistics.median(ts) / 1e6 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=40, help="corpus copies for the memory test")
    args = parser.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="chimera-bench-store-"))
    try:
        spec = CorpusSpec(str(args.corpus), separator=Separator.BLANK_LINE)
        docs = list(iter_documents(spec))
        tokenizer = train_bpe(docs, args.vocab_size)
        rates = bench_tokenization(docs, tokenizer, args.repeats)
        start = time.perf_counter()
        prepare_store(spec, tokenizer, work / "small")
        prepare_rate = args.corpus.stat().st_size / (time.perf_counter() - start) / 1e6

        table = Table(title=f"tokenization of {args.corpus.name} "
                            f"({args.corpus.stat().st_size / 1e6:.2f} MB, {len(docs)} documents, "
                            f"BPE {args.vocab_size})")
        for col in ("path", "MB/s", "vs one at a time"):
            table.add_column(col)
        table.add_row("tokenizers batch (encode_batch_fast)", f"{rates['batch']:.2f}",
                      f"{rates['batch'] / rates['single']:.2f}x")
        table.add_row("one document at a time", f"{rates['single']:.2f}", "1.00x")
        table.add_row("prepare_store end to end (read, tokenize, split, write, verify)",
                      f"{prepare_rate:.2f}", "")
        console.print(table)

        folder = work / "copies"
        folder.mkdir()
        for i in range(args.copies):
            shutil.copy(args.corpus, folder / f"part{i:03d}.txt")
        store, _ = prepare_store(CorpusSpec(str(folder), separator=Separator.BLANK_LINE),
                                 tokenizer, work / "big")
        store_bytes = store.tokens("train").nbytes
        table = Table(title=f"private memory growth per reader, store of {store_bytes / 1e6:.1f} "
                            f"MB ({store.info('train').tokens:,} train tokens)")
        for col in ("readers", "reader", "growth per reader (MB)", "share of store", "target"):
            table.add_column(col)
        for n, copy in ((1, False), (4, False), (4, True)):
            growth = reader_growth(store.root, n, copy)
            worst = max(growth) / store_bytes
            ok = "" if copy else ("< 10% ok" if worst < 0.10 else "< 10% MISSED")
            table.add_row(str(n), "copying" if copy else "memory-mapped",
                          ", ".join(f"{g / 1e6:.2f}" for g in growth), f"{worst:.1%} (max)", ok)
        console.print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
