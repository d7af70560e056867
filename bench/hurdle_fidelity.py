"""How well a short rung predicts the full budget: the evidence behind the search's hurdles.

Random genomes (the search bench's space, corpus, batch and full budget) each train through
every rung (nothing is stopped: keep fraction 1), continuing from their checkpoints, so each
candidate has a validation bits-per-byte at every rung. Printed per rung:

- Spearman rank correlation with the full-budget result, over all candidates and over the
  final top 10 (how well a rung orders the good ones, which is what a hurdle must do);
- how many of the final top third the rung's own best third would keep (a hurdle keeping a
  third at that rung alone would lose the rest).

    python bench/hurdle_fidelity.py          # ~10 minutes: 48 genomes, rungs of 11/22/44/88 steps
    python bench/hurdle_fidelity.py --keep DIR ... then --report DIR   # no training
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.search import DEFAULT_CORPUS, bench_corpus, bench_hparams, ranks  # noqa: E402
from cluster.app.evolve import EvolveSettings, run_evolve  # noqa: E402
from results.db import RunDatabase  # noqa: E402
from search.hurdles import Hurdles  # noqa: E402
from search.loop import SearchLimits  # noqa: E402
from trainers.candidate import BudgetKind, TrainBudget  # noqa: E402

TOP = 10


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks; NaN with fewer than 3 points or no spread."""
    if len(a) < 3:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    spread = math.sqrt(sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb))
    return cov / spread if spread else math.nan


def rung_table(db_path: Path) -> tuple[list[int], list[list[float]]]:
    """Steps of each rung, and for every candidate that finished them all its bpb per rung."""
    db = RunDatabase(db_path, readonly=True)
    try:
        rows = db.rungs()
    finally:
        db.close()
    steps = sorted({row["steps"] for row in rows if row["status"] == "ok"})
    per_candidate: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["status"] == "ok" and row["val_bpb"] is not None:
            per_candidate.setdefault(row["candidate_id"], {})[row["rung"]] = row["val_bpb"]
    complete = [[values[r] for r in range(len(steps))] for values in per_candidate.values()
                if len(values) == len(steps)]
    return steps, complete


def report(db_path: Path, console: Console) -> None:
    if not db_path.exists():
        raise SystemExit(f"{db_path}: no such run database (train one with --keep DIR first)")
    steps, rows = rung_table(db_path)
    if len(rows) < 3:
        raise SystemExit(f"{db_path}: only {len(rows)} candidates finished every rung; "
                         f"need at least 3")
    final = [row[-1] for row in rows]
    top = sorted(range(len(rows)), key=final.__getitem__)[:TOP]
    third = math.ceil(len(rows) / 3)
    final_top_third = set(sorted(range(len(rows)), key=final.__getitem__)[:third])
    table = Table(title=f"{len(rows)} random genomes, every rung trained (validation bpb)")
    for column in ("rung: steps", "Spearman vs full budget", f"... among the final top {TOP}",
                   f"final top third kept by this rung's best third ({third})"):
        table.add_column(column)
    for rung, rung_steps in enumerate(steps):
        at_rung = [row[rung] for row in rows]
        kept = set(sorted(range(len(rows)), key=at_rung.__getitem__)[:third])
        table.add_row(str(rung_steps), f"{spearman(at_rung, final):.3f}",
                      f"{spearman([at_rung[i] for i in top], [final[i] for i in top]):.3f}",
                      f"{len(kept & final_top_third)} of {third}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument("--full-steps", type=int, default=88)
    parser.add_argument("--rungs", type=int, default=4)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="keep the run (results.db) under DIR")
    parser.add_argument("--report", metavar="DIR", help="train nothing: report the run in DIR")
    args = parser.parse_args()
    console = Console()
    if args.report:
        report(Path(args.report) / "results.db", console)
        return
    first_rung, left = divmod(args.full_steps, args.factor ** (args.rungs - 1))
    if left or not first_rung:
        parser.error(f"--full-steps {args.full_steps} must be a positive multiple of "
                     f"{args.factor ** (args.rungs - 1)}")
    run_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chimera-fidelity-"))
    settings = EvolveSettings(
        run_dir=str(run_dir), corpus=bench_corpus(args.corpus), vocab_size=512, seed=args.seed,
        strategy="random", warm_start=False, hparams=bench_hparams(),
        # every candidate goes through every rung: keep all, and no bar to wait for
        hurdles=Hurdles(rungs=args.rungs, factor=args.factor, keep_fraction=1.0, min_results=1),
        limits=SearchLimits(max_candidates=args.candidates),
        candidate_budget=TrainBudget(BudgetKind.STEPS, first_rung), workers=args.workers)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        console.print(f"training {args.candidates} random genomes through "
                      f"{args.rungs} rungs ...")
        run_evolve(settings, Console(quiet=True), live=False)
        report(run_dir / "results.db", console)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
