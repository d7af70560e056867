"""Candidates per hour of the Ray actor-pool evaluator, side by side in one run:

* 1 worker with 1 CPU vs 2 workers with 1 CPU each (target: >= 1.8x on this 2-core machine);
* one 2-thread worker vs two 1-thread workers.

Every layout trains the same fixed list of genomes (sampled from the CPU search space with a
seed, handed out largest first) with the same token budget on the built-in story corpus, so
the comparison measures the execution layer, not different search trajectories. Each layout is
timed twice, interleaved.

    python bench/evolve.py
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the packages, not bench/cluster.py
    sys.path[0] = str(REPO)

from chimera.tokenizer import train_bpe  # noqa: E402
from cluster.ray.evaluator import RayEvaluator  # noqa: E402
from cluster.ray.worker import CandidateSettings  # noqa: E402
from search.genome import CPU  # noqa: E402
from trainers.candidate import BudgetKind, TrainBudget, TrainHparams  # noqa: E402
from trainers.corpus import CorpusSpec, iter_documents  # noqa: E402
from trainers.store import prepare_store  # noqa: E402

LAYOUTS = {  # name: (workers, CPUs and torch threads per worker)
    "1 worker x 1 CPU": (1, 1),
    "2 workers x 1 CPU": (2, 1),
    "1 worker x 2 CPUs": (1, 2),
}


def story_store(work: Path):
    """The built-in 2 MB story corpus with a 1024-token BPE, as ``chimera evolve`` uses."""
    corpus = CorpusSpec("stories", stories_bytes=2_000_000)
    return prepare_store(corpus, train_bpe(iter_documents(corpus), 1024), work / "store")[0]


def sample_genomes(count: int, seed: int = 0):
    """``count`` genomes of the CPU space, largest first: with few candidates of uneven size the
    order decides how long the last one runs alone (the tail), and largest-first keeps that tail
    short for every layout."""
    rng = random.Random(seed)
    return sorted((CPU.sample(rng) for _ in range(count)), key=CPU.params, reverse=True)


def train_all(evaluator: RayEvaluator, genomes) -> float:
    """Seconds for ``evaluator`` to train every genome (its actors started and warm first)."""
    evaluator.wait_until_started(timeout=300)
    warm = [worker.actor.train.remote(genomes[-1].to_dict()) for worker in evaluator.free]
    ray.get(warm)  # actor start-up and imports are not what we measure
    start = time.perf_counter()
    queue = list(enumerate(genomes))
    while queue or evaluator.in_flight():
        while queue and evaluator.in_flight() < evaluator.slots:
            evaluator.submit(*queue.pop(0))
        result = evaluator.next_result(timeout=None)
        assert result is None or result[1]["status"] == "ok", result
    return time.perf_counter() - start


def run_layout(genomes, store, budget: TrainBudget, workers: int, cpus: int) -> float:
    settings = CandidateSettings(store_dir=str(store.root), budget=budget,
                                 hparams=TrainHparams(), seed=0, vocab_size=store.vocab_size,
                                 threads=cpus)
    evaluator = RayEvaluator(settings, workers, cpus_per_candidate=cpus)
    try:
        return train_all(evaluator, genomes)
    finally:
        evaluator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=30_000, help="per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="chimera-bench-evolve-"))
    try:
        store = story_store(work)
        genomes = sample_genomes(args.candidates)
        budget = TrainBudget(BudgetKind.TOKENS, args.tokens)
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.repeats):
            for name, (workers, cpus) in LAYOUTS.items():
                seconds[name].append(run_layout(genomes, store, budget, workers, cpus))
        per_hour = {name: len(genomes) * 3600 / statistics.median(ts)
                    for name, ts in seconds.items()}

        table = Table(title=f"{len(genomes)} candidates of the CPU space, {args.tokens:,} tokens "
                            f"each, 2 CPUs")
        for column in ("layout", "candidates/hour", "vs 1 worker x 1 CPU", "target"):
            table.add_column(column)
        base = per_hour["1 worker x 1 CPU"]
        targets = {"2 workers x 1 CPU": 1.8}
        for name, rate in per_hour.items():
            ratio = rate / base
            target = targets.get(name)
            verdict = "" if target is None else \
                f">= {target}x {'ok' if ratio >= target else 'MISSED'}"
            table.add_row(name, f"{rate:,.0f}", f"{ratio:.2f}x", verdict)
        console.print(table)
        two_threads = per_hour["1 worker x 2 CPUs"]
        console.print(f"two 1-thread workers / one 2-thread worker: "
                      f"{per_hour['2 workers x 1 CPU'] / two_threads:.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
