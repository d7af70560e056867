"""Training speed of the models a search actually trains, against the nanoGPT-style baseline's,
on the same tokens and batch, and the share of this machine's matmul peak each reaches.

From a ``chimera evolve`` run: its median candidate (by the training tokens/s the search
recorded, each beside the other workers) and its winner, rebuilt from their genomes, and
``bench/nanogpt.py``'s default GPT, each timed on batches of the run's own token store at the
run's batch shape with Chimera's optimizer step (``trainers.steps.train_step``). For each
thread count the models' timings interleave (this machine is shared and noisy: the ratios hold
where the absolute figures drift). Printed per model: training tokens/s, its ratio to the
baseline's, matmul FLOPs per token (torch's FlopCounterMode over one step: the fused RG-LRU
and conv kernels' elementwise work is not counted) and those FLOPs per second as a share of
the peak of a large fp32 matmul at the same threads.

    python bench/candidate_throughput.py --run RUN_DIR                  # 1 and 2 threads
    python bench/candidate_throughput.py --run RUN_DIR --compile        # and torch.compile'd
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.nanogpt import GPT, GPTConfig  # noqa: E402
from chimera.model import Chimera  # noqa: E402
from cluster.app.promote.settings import run_settings  # noqa: E402
from cluster.app.rundir import STORE_DIR  # noqa: E402
from results.db import RunDatabase  # noqa: E402
from search.genome import Genome  # noqa: E402
from trainers.candidate import Status  # noqa: E402
from trainers.recipe import TrainHparams, make_optimizer  # noqa: E402
from trainers.steps import train_step  # noqa: E402
from trainers.store import TokenStore  # noqa: E402

CPU = torch.device("cpu")
PEAK_SIZE = 1024  # the square fp32 matmul whose speed stands for the machine's peak


@dataclass
class Subject:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trained: torch.nn.Module  # what runs forward: the model, or torch.compile of it
    flops_per_token: float = 0.0
    rates: dict[int, list[float]] = field(default_factory=dict)  # tokens/s per round, by threads


def search_subjects(run_dir: Path) -> tuple[list[tuple[str, Genome, float]], object]:
    """The run's median candidate by recorded tokens/s and its winner: (label, genome, the
    search's tokens/s), and the run's settings."""
    settings = run_settings(str(run_dir))
    db = RunDatabase(settings.database_target, readonly=True)
    try:
        trained = [r for r in db.finished_records() if r.status is Status.OK
                   and r.reused_from is None and r.tokens_per_second]
        leader = db.leaderboard_records(top=1)[0]
    finally:
        db.close()
    if not trained:
        sys.exit(f"{run_dir}: no candidate trained ok; nothing to measure")
    trained.sort(key=lambda r: r.tokens_per_second)
    median = trained[len(trained) // 2]
    return [(f"median candidate #{median.id}", Genome.from_dict(median.genome),
             median.tokens_per_second),
            (f"winner #{leader.id}", Genome.from_dict(leader.genome), leader.tokens_per_second)
            ], settings


def matmul_peak(threads: int, seconds: float = 1.5) -> float:
    """fp32 FLOP/s of a PEAK_SIZE-square matmul at ``threads``."""
    torch.set_num_threads(threads)
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    a @ b
    began, count = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        a @ b
        count += 1
    return count * 2 * PEAK_SIZE ** 3 / (time.perf_counter() - began)


def step(subject: Subject, batch: torch.Tensor, hparams: TrainHparams, index: int,
         eager: bool = False) -> None:
    train_step(subject.model, subject.optimizer, (batch, None), hparams, progress=0.5,
               step=index, device=CPU, trained=subject.model if eager else subject.trained)


def flops_per_token(subject: Subject, batch: torch.Tensor, hparams: TrainHparams) -> float:
    counter = FlopCounterMode(display=False)
    with counter:  # eager: the counter does not see into compiled code
        step(subject, batch, hparams, 0, eager=True)
    return counter.get_total_flops() / (batch.shape[0] * hparams.seq_len)


def measure(subjects: list[Subject], store: TokenStore, hparams: TrainHparams, threads: int,
            rounds: int, steps: int) -> None:
    """``rounds`` x ``steps`` timed steps of each subject, interleaved, after two warm-up steps
    each (compilation included)."""
    torch.set_num_threads(threads)
    for subject in subjects:
        for index in range(2):
            step(subject, store.sample("train", hparams.batch_size, hparams.seq_len, 0, index),
                 hparams, index)
    for round_index in range(rounds):
        for subject in subjects:
            began = time.perf_counter()
            for index in range(steps):
                batch = store.sample("train", hparams.batch_size, hparams.seq_len, 1,
                                     round_index * steps + index)
                step(subject, batch, hparams, index)
            tokens = steps * hparams.batch_size * hparams.seq_len
            subject.rates.setdefault(threads, []).append(tokens / (time.perf_counter() - began))


def build(name: str, model: torch.nn.Module, hparams: TrainHparams, compiled: bool) -> Subject:
    torch.manual_seed(0)
    model.train()
    return Subject(name + (" (compiled)" if compiled else ""), model,
                   make_optimizer(model, hparams),
                   torch.compile(model) if compiled else model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a chimera evolve run directory")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--compile", action="store_true", help="also each model compiled")
    args = parser.parse_args()
    if not (args.run / STORE_DIR).is_dir():
        parser.error(f"--run {args.run}: not a chimera evolve run directory (no {STORE_DIR}/)")
    console = Console(width=None if sys.stdout.isatty() else 160)
    genomes, settings = search_subjects(args.run)
    store = TokenStore.open(args.run / STORE_DIR)
    hparams = settings.hparams
    subjects, searched = [], {}
    for compiled in (False, True) if args.compile else (False,):
        for label, genome, recorded in genomes:
            config = genome.to_config(store.vocab_size, hparams.seq_len)
            subjects.append(build(f"{label} {genome.summary()}", Chimera(config), hparams,
                                  compiled))
            searched[subjects[-1].name] = recorded
        subjects.append(build("nanoGPT default", GPT(GPTConfig(store.vocab_size)), hparams,
                              compiled))
    probe = store.sample("train", hparams.batch_size, hparams.seq_len, 2, 0)
    for subject in subjects:
        subject.flops_per_token = flops_per_token(subject, probe, hparams)
    peaks = {}
    for threads in args.threads:
        peaks[threads] = matmul_peak(threads)
        measure(subjects, store, hparams, threads, args.rounds, args.steps)
    report(subjects, peaks, searched, hparams, console)


def report(subjects: list[Subject], peaks: dict[int, float], searched: dict[str, float],
           hparams: TrainHparams, console: Console) -> None:
    table = Table(title=f"training tokens/s at batch {hparams.batch_size} x {hparams.seq_len}, "
                        f"medians of the rounds")
    for column in ("model", "params", "MFLOP/token", "threads", "tokens/s", "/ nanoGPT",
                   "matmul peak share", "the search recorded"):
        table.add_column(column)
    baselines = {s.name.removeprefix("nanoGPT default"): s for s in subjects
                 if s.name.startswith("nanoGPT default")}
    for threads, peak in peaks.items():
        for subject in subjects:
            rate = statistics.median(subject.rates[threads])
            suffix = " (compiled)" if subject.name.endswith(" (compiled)") else ""
            base = statistics.median(baselines[suffix].rates[threads])
            params = sum(p.numel() for p in subject.model.parameters())
            recorded = searched.get(subject.name)
            table.add_row(subject.name, f"{params / 1e6:.2f}M",
                          f"{subject.flops_per_token / 1e6:.1f}", str(threads), f"{rate:,.0f}",
                          f"{rate / base:.2f}x", f"{rate * subject.flops_per_token / peak:.0%}",
                          "" if recorded is None else f"{recorded:,.0f}")
        table.add_section()
    console.print(table)
    console.print("matmul peak (fp32, " + ", ".join(
        f"{t} thread{'s' * (t > 1)}: {p / 1e9:.0f} GFLOP/s" for t, p in peaks.items()) + ")",
        highlight=False)


if __name__ == "__main__":
    main()
