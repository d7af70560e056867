"""Ray at cluster scale, on simulated nodes (``ray.cluster_utils.Cluster``), in one run:

1. Resident memory of the token store with 1 vs 4 worker actors on one node. The store is
   shipped through the object store and copied to the node once; every actor memory-maps that
   copy and reads all of it. Reported from each actor's /proc/self/smaps: the proportional set
   size (PSS: a page shared by k processes counts 1/k) summed over actors, against the store's
   size; a copy per actor would hold k times the store.
2. Candidates per hour on one simulated node vs two (one 1-CPU worker per node), the same
   fixed list of genomes each time, interleaved and repeated.
3. With ``--memory``: the memory estimate that rejects oversized candidates against the peak
   resident memory of a fresh process training each of a few configs.

    python bench/cluster.py [--memory]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This script's name would shadow the `cluster` package (and Ray workers inherit sys.path).
sys.path[0] = str(REPO)

import argparse  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.evolve import sample_genomes, story_store, train_all  # noqa: E402
from chimera.config import ChimeraConfig  # noqa: E402
from chimera.tokenizer import train_char  # noqa: E402
from cluster.ray.evaluator import RayEvaluator  # noqa: E402
from cluster.ray.node_store import StoreTransfer, ship_store  # noqa: E402
from cluster.ray.worker import CandidateSettings  # noqa: E402
from trainers.candidate import (  # noqa: E402
    BudgetKind,
    TrainBudget,
    TrainHparams,
    estimate_training_memory,
)
from trainers.corpus import CorpusSpec, iter_documents  # noqa: E402
from trainers.store import prepare_store  # noqa: E402

MiB = 2**20


def _settings(store, threads: int = 1, tokens: int = 30_000) -> CandidateSettings:
    return CandidateSettings(store_dir=str(store.root), budget=TrainBudget(BudgetKind.TOKENS,
                                                                           tokens),
                             hparams=TrainHparams(), seed=0, vocab_size=store.vocab_size,
                             threads=threads)


def _cluster(nodes: int, cpus: int) -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus)
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    return cluster


def _stop(cluster: Cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


def store_memory(work: Path, megabytes: int, console: Console) -> None:
    corpus = CorpusSpec("stories", stories_bytes=megabytes * 1_000_000)
    with console.status(f"building a {megabytes} MB story store"):
        store = prepare_store(corpus, train_char(iter_documents(corpus)), work / "big")[0]
    size = sum(p.stat().st_size for p in store.root.rglob("*.arrow"))
    cluster = _cluster(nodes=1, cpus=4)
    rows = []
    try:
        source = ship_store(store.root, StoreTransfer.COPY, str(work / "node-stores"))
        for actors in (1, 4):
            evaluator = RayEvaluator(_settings(store), actors, 1.0, store=source)
            try:
                assert evaluator.wait_until_started(120) == actors
                memory = ray.get([w.actor.store_memory.remote() for w in evaluator.free])
                origins = sorted(w.info["store_origin"] for w in evaluator.free)
            finally:
                evaluator.close()
            pss = sum(m["pss"] for m in memory)
            rss = sum(m["rss"] for m in memory)
            rows.append((actors, pss, rss, origins))
    finally:
        _stop(cluster)
    table = Table(title=f"token store memory on one node ({size / MiB:.1f} MiB of tokens)")
    for column in ("actors", "store PSS, all actors", "vs 1 actor", "sum of RSS",
                   "a copy per actor", "store origins"):
        table.add_column(column)
    base = rows[0][1]
    for actors, pss, rss, origins in rows:
        table.add_row(str(actors), f"{pss / MiB:.1f} MiB", f"{pss / base:.2f}x",
                      f"{rss / MiB:.1f} MiB", f"{actors * size / MiB:.1f} MiB",
                      ", ".join(origins))
    console.print(table)


def nodes_throughput(work: Path, candidates: int, tokens: int, repeats: int,
                     console: Console) -> None:
    with console.status("building the 2 MB story store"):
        store = story_store(work)
    genomes = sample_genomes(candidates)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for nodes in (1, 2):
            cluster = _cluster(nodes=nodes, cpus=1)
            try:  # each node gets its own copy of the store, as on a real cluster
                source = ship_store(store.root, StoreTransfer.COPY,
                                    str(work / f"node-stores-{nodes}"))
                evaluator = RayEvaluator(_settings(store, tokens=tokens), nodes, 1.0,
                                         store=source)
                try:
                    seconds[nodes].append(train_all(evaluator, genomes))
                finally:
                    evaluator.close()
            finally:
                _stop(cluster)
    per_hour = {n: len(genomes) * 3600 / statistics.median(ts) for n, ts in seconds.items()}
    table = Table(title=f"{len(genomes)} candidates of the CPU space, {tokens:,} tokens each, "
                        f"one 1-CPU worker per simulated node (median of {repeats})")
    for column in ("nodes", "candidates/hour", "vs one node"):
        table.add_column(column)
    for nodes, rate in per_hour.items():
        table.add_row(str(nodes), f"{rate:,.0f}", f"{rate / per_hour[1]:.2f}x")
    console.print(table)


MEMORY_CONFIGS = {  # name: (genes, batch, seq_len)
    "d64 L2, 1k vocab": (dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              recurrence_ratio=1, window_size=64), 16, 128),
    "d256 L8 RRRA": (dict(vocab_size=1024, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2,
                          recurrence_ratio=3, window_size=128), 32, 512),
    "d512 L8 RRA, 4k vocab": (dict(vocab_size=4096, d_model=512, n_layers=8, n_heads=8,
                                   n_kv_heads=2, recurrence_ratio=2, window_size=256), 16, 512),
    "d256 L6 attention only": (dict(vocab_size=1024, d_model=256, n_layers=6, n_heads=8,
                                    n_kv_heads=8, recurrence_ratio=0, window_size=512), 32, 512),
}


def _peak_of_training(genes: dict, batch: int, seq_len: int, queue) -> None:
    """In a fresh process: two training steps; its peak resident bytes."""
    import torch
    import torch.nn.functional as F

    from chimera.model import Chimera
    from trainers.candidate import make_optimizer

    torch.set_num_threads(1)
    config = ChimeraConfig(**genes)
    model = Chimera(config)
    optimizer = make_optimizer(model, TrainHparams())
    for _ in range(2):
        tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory_estimate(console: Console) -> None:
    table = Table(title="training memory: estimate vs measured peak (fresh process, fp32)")
    for column in ("config", "batch x seq", "measured peak", "estimate", "estimate / peak"):
        table.add_column(column)
    context = mp.get_context("spawn")
    for name, (genes, batch, seq_len) in MEMORY_CONFIGS.items():
        queue = context.Queue()
        process = context.Process(target=_peak_of_training, args=(genes, batch, seq_len, queue))
        process.start()
        peak = queue.get()
        process.join()
        estimate = estimate_training_memory(ChimeraConfig(**genes),
                                            TrainHparams(batch_size=batch, seq_len=seq_len))
        table.add_row(name, f"{batch} x {seq_len}", f"{peak / MiB:,.0f} MiB",
                      f"{estimate / MiB:,.0f} MiB", f"{estimate / peak:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store-mb", type=int, default=20, help="story text for part 1")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=30_000, help="per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also check the memory estimate")
    args = parser.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="chimera-bench-cluster-"))
    try:
        store_memory(work, args.store_mb, console)
        nodes_throughput(work, args.candidates, args.tokens, args.repeats, console)
        if args.memory:
            memory_estimate(console)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
