"""Search methods against each other for the same compute, on tinyshakespeare:

    evolution + hurdles | evolution | random | Optuna TPE | Optuna NSGA-II

and, asked for by --methods, Optuna TPE + hurdles (TPE proposes, the hurdles screen).

Every method runs the same `chimera evolve` machinery (same space, repair, trainer, validation
windows, Ray workers) with the same wall-clock budget per run, over several seeds, and none
starts from the presets (they would be every method's first candidates, and the best of a short
run). Without hurdles every candidate trains the full budget; with hurdles candidates start at
a quarter of it and only those clearing each rung go on (2x, then 4x: 22, 44, 88 steps), as in
So et al.'s progressive dynamic hurdles, whose baseline trains every candidate fully.

Compute is measured as worker-seconds spent training (every rung counted), in the order
results arrived; with --flops every run instead gets the same budget of training FLOPs (the
model's count of each candidate's training, `chimera evolve --flops`), and compute is measured
in FLOPs: the same on any machine, where a wall-clock budget buys fewer candidates on a slower
one. Printed per method: the best validation bits per byte (median and range over
seeds), and the compute at which the method first reached random search's final best of the
same seed (median; "never" if it did not). Every seed is scored on the same validation documents
(--data-seed; --split-per-seed gives each seed its own, as the runs before session 6 did, which
moves bpb levels by up to 0.2 between seeds). Paired by seed, the table adds each method's mean
rank among the methods and its median difference to random's best. A best-so-far plot (raw, and
paired with random) goes to bench/figures/ (the one BENCHMARKS.md shows) when the five methods
above ran, else only where --plot says.

    python bench/search.py                    # ~55 minutes: 5 methods x 3 seeds x 200 s
    python bench/search.py --seconds 40 --seeds 1 --methods random hurdles   # a smoke run
    python bench/search.py --keep DIR ... then --report DIR   # keep runs; re-report, no training
    python bench/search.py --keep DIR --seeds 3 --first-seed 3   # three more seeds into DIR
    python bench/search.py --flops 12T ...   # a FLOPs budget per run instead of wall clock
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cluster.app.evolve import EvolveSettings, run_evolve  # noqa: E402
from cluster.cli.argtypes import parse_flops  # noqa: E402
from results.db import RunDatabase  # noqa: E402
from results.plots import compute_and_scores  # noqa: E402
from search.evolution import EvolutionConfig  # noqa: E402
from search.hurdles import Hurdles  # noqa: E402
from search.loop import SearchLimits  # noqa: E402
from trainers.candidate import BudgetKind, TrainBudget, TrainHparams  # noqa: E402
from trainers.corpus import CorpusSpec, Separator  # noqa: E402

DEFAULT_CORPUS = REPO.parent / "shared/data/tinyshakespeare.txt"
RECORDED_PLOT = Path("bench/figures/search_best_so_far.png")  # shown in BENCHMARKS.md
METHODS = {  # id: (shown as, strategy, hurdles?)
    "hurdles": ("evolution + hurdles", "evolution", True),
    "evolution": ("evolution", "evolution", False),
    "random": ("random", "random", False),
    "tpe": ("Optuna TPE", "tpe", False),
    "nsga2": ("Optuna NSGA-II", "nsga2", False),
    # Not run unless asked for (--methods): TPE proposing the candidates that hurdles screen,
    # close to BOHB; it separates what the hurdles add from what evolution's proposals add.
    "tpe-hurdles": ("Optuna TPE + hurdles", "tpe", True),
}
DEFAULT_METHODS = ("hurdles", "evolution", "random", "tpe", "nsga2")  # the five


def bench_hparams() -> TrainHparams:
    return TrainHparams(batch_size=8, seq_len=128)


def bench_corpus(path: str) -> CorpusSpec:
    return CorpusSpec(path, separator=Separator.BLANK_LINE)


def ranks(values: list[float]) -> list[float]:
    """Rank of each value (0 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2
        i = j + 1
    return result


def curve(db_path: Path, flops: bool = False) -> tuple[list[tuple[float, float]], float]:
    """Best-so-far (compute, bpb) after each result, and the final best; compute in
    worker-seconds or (``flops``) training FLOPs. With hurdles every rung's training counts as
    compute, and only full-budget results count as bests."""
    db = RunDatabase(db_path, readonly=True)
    try:
        rows = db.candidate_records()
        if flops and not any(row.train_flops for row in rows):
            raise SystemExit(f"{db_path}: no training FLOPs recorded (a run made before they "
                             f"were); report it without --flops")
        scored = compute_and_scores(rows, db.rung_records(), flops=flops)
    finally:
        db.close()
    best, points = float("inf"), []
    for spent, bpb in scored:
        best = min(best, bpb if bpb is not None else best)
        points.append((spent, best))
    return points, best


def _run_dir(work: Path, method: str, seed: int) -> Path:
    _, strategy, hurdled = METHODS[method]
    return work / f"{strategy}{'-hurdles' if hurdled else ''}-{seed}"


def best_at(points: list[tuple[float, float]], spent: float) -> float:
    """The best so far once ``spent`` worker-seconds were used (inf before any result)."""
    return next((best for at, best in reversed(points) if at <= spent), math.inf)


def compute_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    return next((spent for spent, best in points if best <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--seconds", type=float, default=200, help="wall clock per run")
    parser.add_argument("--flops", type=parse_flops, metavar="FLOPS",
                        help="a budget of training FLOPs per run instead of --seconds (e.g. "
                             "12T), and compute measured in FLOPs")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run from this one (add seeds to a kept set of runs)")
    parser.add_argument("--seed-list", type=int, nargs="+", metavar="SEED",
                        help="exactly these seeds, instead of --seeds and --first-seed (to "
                             "report kept runs whose seeds are not consecutive)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--data-seed", type=int, default=0,
                       help="the train/validation split every seed shares (default 0)")
    split.add_argument("--split-per-seed", action="store_true",
                       help="each seed draws its own split (how runs before session 6 ran)")
    parser.add_argument("--full-steps", type=int, default=88, help="a candidate's full budget")
    parser.add_argument("--hurdle-factor", type=int, default=2,
                        help="hurdles: each rung's budget is this many times the last (3 rungs)")
    parser.add_argument("--hurdle-window", type=int,
                        help="hurdles: each rung's bar from its last N results (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--population", type=int, default=8,
                        help="evolution's population, TPE's start-up trials, NSGA-II's "
                             "population: smaller than the number of candidates a run trains")
    parser.add_argument("--tournament", type=int, default=3)
    parser.add_argument("--gene-pool", type=float, default=0.0, metavar="FRACTION",
                        help="evolution: children recombine the best FRACTION of the "
                             "population (gene-pool recombination; 0: tournaments)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        choices=list(METHODS))
    parser.add_argument("--keep", metavar="DIR",
                        help="keep every run (results.db, run.json) under DIR for inspection")
    parser.add_argument("--plot", metavar="PNG",
                        help=f"where the best-so-far plot goes (default: {RECORDED_PLOT} when "
                             f"every method runs; no plot otherwise)")
    parser.add_argument("--report", metavar="DIR",
                        help="train nothing: print the table and plot of the runs kept in DIR "
                             "(pass the options they ran with)")
    args = parser.parse_args()
    hurdles = Hurdles(rungs=3, factor=args.hurdle_factor, keep_fraction=1 / 3, min_results=3,
                      window=args.hurdle_window)
    first_rung, left = divmod(args.full_steps, args.hurdle_factor ** (hurdles.rungs - 1))
    if left:  # the last rung must be the full budget, or the comparison is not like for like
        parser.error(f"--full-steps {args.full_steps} is not a multiple of "
                     f"{args.hurdle_factor ** (hurdles.rungs - 1)}")
    methods = [m for m in METHODS if m in args.methods]
    seeds = args.seed_list or range(args.first_seed, args.first_seed + args.seeds)
    args.seeds = len(seeds)
    console = Console(width=None if sys.stdout.isatty() else 150)  # logs: the table unwrapped
    if args.report:
        missing = [str(_run_dir(Path(args.report), m, seed)) for m in methods for seed in seeds
                   if not (_run_dir(Path(args.report), m, seed) / "results.db").exists()]
        if missing:
            parser.error(f"no kept run in {', '.join(missing)} (pass the --methods and --seeds "
                         f"they ran with)")
        runs = {m: [curve(_run_dir(Path(args.report), m, seed) / "results.db",
                          flops=bool(args.flops)) for seed in seeds] for m in methods}
        report(methods, {m: [points for points, _ in runs[m]] for m in methods},
               {m: [best for _, best in runs[m]] for m in methods}, args, console)
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chimera-bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    hparams, corpus = bench_hparams(), bench_corpus(args.corpus)
    curves: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in methods}
    bests: dict[str, list[float]] = {m: [] for m in methods}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        for seed in seeds:
            for method in methods:
                _, strategy, hurdled = METHODS[method]
                steps = first_rung if hurdled else args.full_steps
                run_dir = _run_dir(work, method, seed)
                settings = EvolveSettings(
                    run_dir=str(run_dir), corpus=corpus, vocab_size=512, seed=seed,
                    data_seed=seed if args.split_per_seed else args.data_seed,
                    strategy=strategy, hurdles=hurdles if hurdled else None,
                    warm_start=False,  # the presets would be every method's first picks
                    limits=SearchLimits(train_flops=args.flops) if args.flops else
                    SearchLimits(wall_seconds=args.seconds), hparams=hparams,
                    candidate_budget=TrainBudget(BudgetKind.STEPS, int(steps)),
                    workers=args.workers,
                    evolution=EvolutionConfig(population_size=args.population,
                                              tournament_size=args.tournament,
                                              gene_pool_fraction=args.gene_pool))
                console.print(f"seed {seed}: {METHODS[method][0]} ...", highlight=False)
                outcome = run_evolve(settings, Console(quiet=True), live=False)
                points, best = curve(run_dir / "results.db", flops=bool(args.flops))
                curves[method].append(points)
                bests[method].append(best)
                console.print(f"  {outcome.report.completed} candidates, best {best:.4f} bpb, "
                              f"{_compute(points[-1][0] if points else 0, args)}",
                              highlight=False)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(methods, curves, bests, args, console)


def _compute(spent: float, args) -> str:
    return f"{spent / 1e12:.2f} TFLOPs" if args.flops else f"{spent:.0f} worker-s"


def report(methods, curves, bests, args, console) -> None:
    budget = f"{args.flops:.3g} training FLOPs" if args.flops else \
        f"{args.seconds:.0f} s x {args.workers} workers"
    unit = "TFLOPs" if args.flops else "worker-s"
    scale = 1e12 if args.flops else 1.0
    table = Table(title=f"tinyshakespeare, {budget} per run, {args.seeds} seeds, population "
                        f"{args.population} (validation bits per byte; lower is better)")
    for column in ("method", "best bpb: median", "range", "per seed", "mean rank",
                   "minus random's best: median", f"{unit} to reach random's best",
                   "vs random"):
        table.add_column(column)
    # Paired by seed (1 = best on that seed): seeds differ in their search and, with
    # --split-per-seed, in their validation documents, which moves every method's bpb alike.
    per_seed = [ranks([bests[m][i] for m in methods]) for i in range(len(bests[methods[0]]))]
    random_cost = [compute_to_reach(c, b) for c, b in zip(curves.get("random", []),
                                                           bests.get("random", []))]
    for method in methods:
        values = bests[method]
        row = [METHODS[method][0], f"{statistics.median(values):.4f}",
               f"{min(values):.4f} - {max(values):.4f}",
               " / ".join(f"{value:.4f}" for value in values),
               f"{1 + statistics.mean(r[methods.index(method)] for r in per_seed):.1f}"]
        if "random" in curves:
            row.append(f"{statistics.median(v - r for v, r in zip(values, bests['random'])):+.4f}")
            reach = [compute_to_reach(c, target) for c, target in
                     zip(curves[method], bests["random"])]
            done = [r for r in reach if r is not None]
            median_reach = statistics.median(done) if len(done) == len(reach) else None
            reached = [r for r in random_cost if r is not None]
            base = statistics.median(reached) if reached else None  # None: random found nothing
            row += [f"{median_reach / scale:.{2 if args.flops else 0}f}"
                    if median_reach is not None else
                    f"never in {len(reach) - len(done)} of {len(reach)}",
                    f"{median_reach / base:.2f}x" if median_reach is not None and base else "-"]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    console.print(table)
    out = Path(args.plot) if args.plot else REPO / RECORDED_PLOT if set(methods) == set(
        DEFAULT_METHODS) else None
    if out is None:  # a partial run must not replace the recorded comparison
        console.print("no plot: not the five recorded methods (pass --plot PNG for one)")
        return
    paired = "random" in bests
    figure, panels = plt.subplots(1, 2 if paired else 1, figsize=(14 if paired else 8, 5),
                                  squeeze=False)
    axes = panels[0][0]
    xlabel = "compute (training FLOPs)" if args.flops else \
        "compute (worker-seconds of candidate training)"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, method in zip(colors, methods):
        for i, points in enumerate(curves[method]):
            if points:
                axes.step(*zip(*points), where="post", color=color, alpha=0.8,
                          label=METHODS[method][0] if i == 0 else None)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("best validation bits per byte so far")
    axes.set_title("search methods on tinyshakespeare (one line per seed)")
    axes.grid(alpha=0.3)
    axes.legend()
    if paired:  # compare with random on the same seed (and split)
        axes = panels[0][1]
        end = max(points[-1][0] for runs in curves.values() for points in runs if points)
        grid = [end * k / 200 for k in range(201)]
        for color, method in zip(colors, methods):
            gaps = [[best_at(points, x) - target for x in grid]
                    for points, target in zip(curves[method], bests["random"])]
            axes.plot(grid, [statistics.median(column) if all(map(math.isfinite, column))
                             else math.nan for column in zip(*gaps)],
                      color=color, label=METHODS[method][0])
        axes.axhline(0.0, color="gray", linestyle="--", linewidth=1)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("best so far minus random's final best (bpb)")
        axes.set_title("median over seeds, paired with random search on each seed")
        axes.grid(alpha=0.3)
        axes.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    console.print(f"plot: {out}")


if __name__ == "__main__":
    main()
