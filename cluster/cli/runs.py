"""``chimera evolve`` and what reads a run: ``leaderboard``, ``export``, ``plot``.

The options' defaults are the library's own (``EvolveSettings``, ``EvolutionConfig``,
``Hurdles``, ``TrainHparams``, ...), read from the dataclasses, so the command line and
``run_evolve`` cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live

from chimera.checkpoint import atomic_write
from cluster.app.candidate_budget import TOKENS_PER_CANDIDATE
from cluster.app.evolve import (
    STRATEGIES,
    EvolveSettings,
    load_settings,
    print_outcome,
    run_evolve,
)
from cluster.app.rundir import DATABASE_FILE, check_new_run_dir
from cluster.cli import argtypes
from cluster.cli.argtypes import parse_duration, parse_flops
from cluster.cli.clock import seconds_since_launch
from cluster.cli.data import add_corpus_options, corpus_spec
from cluster.cli.errors import CommandError
from cluster.ray.node_store import DEFAULT_CACHE_ROOT, StoreTransfer
from cluster.ray.worker import FaultPolicy
from results.db import RunDatabase
from results.export import write_parquet
from results.leaderboard import counts_line, leaderboard_table
from search.evolution import EvolutionConfig
from search.genome import SPACES
from search.hurdles import Hurdles
from search.loop import SearchLimits
from search.objectives import Objectives
from search.pareto import pareto_front
from trainers.candidate import BudgetKind, TrainBudget, TrainHparams


def evolve_settings(args: argparse.Namespace) -> EvolveSettings:
    """The run the options describe (a resumed run's own, with this session's limits)."""
    wall = args.budget
    if wall is None and args.max_candidates is None and args.max_generations is None \
            and args.flops is None:
        wall = EvolveSettings.limits.wall_seconds
    limits = SearchLimits(wall_seconds=wall, max_candidates=args.max_candidates,
                          max_generations=args.max_generations, train_flops=args.flops)
    if args.resume:  # the stored configuration, with this session's limits and execution
        if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise CommandError(f"--run-dir {args.run_dir} and --resume {args.resume} name two "
                               f"runs; --resume RUN_DIR alone continues a run")
        settings = load_settings(args.resume)
        return dataclasses.replace(settings, limits=limits, workers=args.workers,
                                   address=args.address, in_process=args.in_process,
                                   faults=_fault_policy(args, settings.faults))
    # None: EvolveSettings chooses (equal time on a wall clock, else tokens)
    candidate_budget = next((TrainBudget(k, v) for k, v in (
        (BudgetKind.TOKENS, args.candidate_tokens), (BudgetKind.STEPS, args.candidate_steps),
        (BudgetKind.SECONDS, args.candidate_seconds)) if v is not None), None)
    run_dir = args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_run_dir(run_dir)  # never overwrite a run, or mix a new one into another's files
    return EvolveSettings(
        run_dir=run_dir, corpus=corpus_spec(args, args.data_seed), tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, space=args.space,
        evolution=EvolutionConfig(population_size=args.population,
                                  tournament_size=args.tournament,
                                  gene_pool_fraction=args.gene_pool,
                                  population_fraction=args.population_fraction or None),
        limits=limits, candidate_budget=candidate_budget,
        hparams=TrainHparams(learning_rate=args.lr, batch_size=args.batch_size,
                             seq_len=args.seq_len, optimizer=args.optimizer),
        seed=args.seed, data_seed=args.data_seed, warm_start=not args.no_warm_start,
        strategy=args.strategy,
        objectives=Objectives.parse(args.objective).names, max_params=args.max_params,
        hurdles=Hurdles(args.hurdles, args.hurdle_factor, args.hurdle_keep,
                        window=args.hurdle_window)
        if args.hurdles > 1 else None,
        workers=args.workers,
        cpus_per_candidate=args.cpus_per_candidate, gpus_per_candidate=args.gpus_per_candidate,
        address=args.address, in_process=args.in_process, database=args.database,
        faults=_fault_policy(args, FaultPolicy()), store_transfer=StoreTransfer(
            args.store_transfer), store_cache=args.store_cache or DEFAULT_CACHE_ROOT)


def _fault_policy(args: argparse.Namespace, base: FaultPolicy) -> FaultPolicy:
    """``base`` with the fault options given on the command line."""
    given = {field: value for field, value in (("max_attempts", args.max_attempts),
                                               ("heartbeat_seconds", args.heartbeat),
                                               ("hang_seconds", args.hang_timeout))
             if value is not None}
    return dataclasses.replace(base, **given)


def cmd_evolve(args: argparse.Namespace, console: Console) -> int:
    try:
        settings = evolve_settings(args)
        console.print(f"[bold]chimera evolve[/bold] -> {settings.run_dir} "
                      f"({settings.space} space, candidates train "
                      f"{settings.candidate_budget.describe()} each)")
        outcome = run_evolve(settings, console, live=not args.no_live,
                             spent_seconds=seconds_since_launch())
    except (ValueError, FileNotFoundError) as err:  # the settings' own validation
        raise CommandError(str(err)) from None
    print_outcome(outcome, settings.run_dir, console)
    return 130 if outcome.report.stop_reason == "interrupted" else 0


def _open_run(run: str):
    """The run database of a run directory, a results.db file or a database URL, read-only."""
    target = run
    if Path(run).is_dir():
        try:
            target = load_settings(run).database_target
        except FileNotFoundError:
            target = str(Path(run) / DATABASE_FILE)
    try:
        return RunDatabase(target, readonly=True)
    except FileNotFoundError as err:
        raise CommandError(f"{err}; is {run} a run directory?") from None


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    db = _open_run(args.run)
    out = Path(args.parquet)
    try:
        rows = db.candidate_records()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: write_parquet(rows, tmp))
    except OSError as err:
        raise CommandError(f"cannot write {args.parquet}: {err.strerror or err}") from None
    finally:
        db.close()
    console.print(f"wrote {len(rows)} candidates to {args.parquet}", highlight=False)
    return 0


def cmd_plot(args: argparse.Namespace, console: Console) -> int:
    import matplotlib.pyplot as plt

    from results.plots import best_so_far_figure, fully_trained, lineage_figure, pareto_figure

    db = _open_run(args.run)
    try:
        rows, leaders, rungs = db.candidate_records(), db.leaderboard_records(1), db.rung_records()
    finally:
        db.close()
    if not leaders:
        raise CommandError(f"{args.run}: no candidate has finished ok yet; nothing to plot")
    if args.flops and not any(row.train_flops for row in rows):
        raise CommandError(f"{args.run}: no training FLOPs recorded (a run made before they "
                           f"were); plot it without --flops")
    ok = fully_trained(rows, rungs)
    front = {ok[i].id for i in pareto_front([(r.val_bpb, r.params) for r in ok])}
    out = Path(args.out or (Path(args.run) / "plots" if Path(args.run).is_dir() else "plots"))
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.run).parent.name if args.run.endswith(".db") else Path(args.run).name
    figures = {"best_so_far.png": best_so_far_figure(rows, f"best so far: {name}", rungs,
                                                     flops=args.flops),
               "pareto.png": pareto_figure(ok, front, f"bpb against parameters: {name}"),
               "lineage.png": lineage_figure(rows, leaders[0].id)}
    for name, figure in figures.items():
        atomic_write(out / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=120))
        plt.close(figure)
        console.print(f"wrote {out / name}", highlight=False)
    return 0


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    db = _open_run(args.run)

    def render():
        leaders = db.leaderboard_records(args.top)
        return Group(leaderboard_table(leaders, f"top {args.top} of {args.run}",
                                       db.parent_genomes(leaders)),
                     counts_line(db.counts()))

    if args.json:
        rows = [record.to_dict() for record in db.leaderboard_records(args.top)]
        for row in rows:
            del row["result"]
        print(json.dumps(rows, indent=2))
    elif args.watch:
        with Live(render(), console=console, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(render())
            except KeyboardInterrupt:
                pass
    else:
        console.print(render())
    db.close()
    return 0


def register(commands) -> None:
    """Add ``evolve``, ``export``, ``plot`` and ``leaderboard`` to the main parser."""
    evolve = commands.add_parser(
        "evolve", help="run an evolutionary architecture search",
        description="Aging evolution over Chimera architectures, candidates trained on Ray "
                    "workers, results in RUN_DIR/results.db, a live leaderboard.")
    _add_limits_options(evolve)
    _add_run_options(evolve)
    _add_data_options(evolve)
    _add_search_options(evolve)
    _add_candidate_training_options(evolve)
    _add_execution_options(evolve)
    _add_faults_options(evolve)
    evolve.set_defaults(handler=cmd_evolve)
    export = commands.add_parser(
        "export", help="export a run's candidates (Parquet, for pandas / duckdb / polars)")
    export.add_argument("run", help="a run directory, its results.db, or a database URL")
    export.add_argument("--parquet", required=True, metavar="FILE")
    export.set_defaults(handler=cmd_export)

    plot = commands.add_parser("plot", help="draw a run's progress, Pareto front and the "
                                             "winner's lineage as PNG files")
    plot.add_argument("run", help="a run directory, its results.db, or a database URL")
    plot.add_argument("--out", metavar="DIR", help="default: RUN/plots")
    plot.add_argument("--flops", action="store_true",
                      help="compute in training FLOPs instead of worker-hours")
    plot.set_defaults(handler=cmd_plot)

    board = commands.add_parser("leaderboard", help="show a run's leaderboard (also while it "
                                                    "runs)")
    board.add_argument("run", help="a run directory, its results.db, or a database URL")
    board.add_argument("--top", type=argtypes.positive_int, default=10)
    board.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    board.add_argument("--interval", type=argtypes.positive_float, default=2.0,
                       help="seconds between refreshes")
    board.add_argument("--json", action="store_true", help="machine-readable output")
    board.set_defaults(handler=cmd_leaderboard)


def _add_limits_options(evolve) -> None:
    limits = evolve.add_argument_group("limits")
    limits.add_argument("--budget", type=parse_duration, default=None,
                        help="wall-clock budget, e.g. 90s, 5m, 1h (default 3m when no other "
                             "limit is given)")
    limits.add_argument("--flops", type=parse_flops, metavar="FLOPS",
                        help="training-compute budget, e.g. 2e13 or 20T, counted over every "
                             "session of the run (no candidate starts whose full budget would "
                             "overrun it); unlike --budget, the same on any machine")
    limits.add_argument("--max-candidates", type=argtypes.positive_int)
    limits.add_argument("--max-generations", type=argtypes.positive_int)


def _add_run_options(evolve) -> None:
    run = evolve.add_argument_group("run")
    run.add_argument("--run-dir", help="where the run lives (default runs/<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    run.add_argument("--seed", type=argtypes.seed, default=EvolveSettings.seed,
                     help="seed of the search (proposals, initial weights, batch order)")
    run.add_argument("--no-live", action="store_true", help="no live display")
    run.add_argument("--database", metavar="URL",
                     help="a SQLAlchemy URL for the results (default: RUN_DIR/results.db)")


def _add_data_options(evolve) -> None:
    data = evolve.add_argument_group("data (default: the built-in story corpus)")
    add_corpus_options(data, corpus=EvolveSettings.corpus.source)
    data.add_argument("--tokenizer", default=EvolveSettings.tokenizer,
                      help="bpe, char or a tokenizer directory")
    data.add_argument("--vocab-size", type=argtypes.positive_int,
                      default=EvolveSettings.vocab_size)
    data.add_argument("--data-seed", type=argtypes.seed, default=EvolveSettings.data_seed,
                      help="seed of the built-in stories and the train/validation split, apart "
                           "from --seed so that runs with different seeds share a validation "
                           "set")


def _add_search_options(evolve) -> None:
    search = evolve.add_argument_group("search")
    search.add_argument("--space", default=EvolveSettings.space, choices=sorted(SPACES),
                        help="the search space")
    search.add_argument("--strategy", default=EvolveSettings.strategy, choices=STRATEGIES,
                        help="aging evolution (default), or a baseline: random search, "
                             "Optuna TPE, Optuna NSGA-II")
    search.add_argument("--population", type=argtypes.positive_int,
                        default=EvolutionConfig.population_size,
                        help="evolution: the largest population (default: %(default)s)")
    search.add_argument("--population-fraction", type=argtypes.fraction,
                        default=EvolutionConfig.population_fraction, metavar="FRACTION",
                        help="evolution: the population is FRACTION of the candidates the "
                             "budget is expected to train, at most --population, so short "
                             "runs breed too; 0: always --population (default: %(default)s)")
    search.add_argument("--tournament", type=argtypes.positive_int,
                        default=EvolutionConfig.tournament_size,
                        help="evolution: tournament size at the largest population; it "
                             "shrinks with the population (default: %(default)s)")
    search.add_argument("--gene-pool", type=argtypes.non_negative_float,
                        default=EvolutionConfig.gene_pool_fraction,
                        metavar="FRACTION",
                        help="evolution: each child draws every gene from one of the best "
                             "FRACTION of the population, then mutates (gene-pool "
                             "recombination) instead of mutating a tournament winner "
                             "(default: 0, tournaments)")
    search.add_argument("--no-warm-start", action="store_true", help="do not seed with presets")
    search.add_argument("--hurdles", type=argtypes.non_negative_int, default=0, metavar="RUNGS",
                        help="progressive hurdles: train each candidate in RUNGS budget rungs "
                             "(the candidate budget, then x factor each), continuing only those "
                             "that clear each rung (default: off)")
    search.add_argument("--hurdle-factor", type=argtypes.positive_float,
                        default=Hurdles.factor,
                        help="each rung trains this many times longer in total than the last "
                             "(default 2: shorter first rungs rank candidates poorly)")
    search.add_argument("--objective", default=",".join(EvolveSettings.objectives),
                        help="what to minimise: bpb, or several for a Pareto search, e.g. "
                             "bpb,params or bpb,params,throughput")
    search.add_argument("--max-params", type=argtypes.positive_int,
                        help="parameter budget (candidates are shrunk to fit)")
    search.add_argument("--hurdle-keep", type=argtypes.positive_float,
                        default=Hurdles.keep_fraction,
                        help="share of a rung's results that continue (default 1/3)")
    search.add_argument("--hurdle-window", type=argtypes.positive_int, metavar="N",
                        help="set each rung's bar from its last N results, so it rises with an "
                             "improving population (default: all results so far)")


def _add_candidate_training_options(evolve) -> None:
    candidates = evolve.add_argument_group("candidate training")
    per = candidates.add_mutually_exclusive_group()
    candidates.description = (
        "each candidate's training (default: with a wall clock, equal seconds each, from 20 s "
        "for 3 minutes on 2 workers up to 120 s, so that candidates are ranked by what they "
        f"reach in equal time on this machine; without one, or with --hurdles or --flops, "
        f"{TOKENS_PER_CANDIDATE:,} tokens each)")
    per.add_argument("--candidate-tokens", type=argtypes.positive_int)
    per.add_argument("--candidate-steps", type=argtypes.positive_int)
    per.add_argument("--candidate-seconds", type=argtypes.positive_float)
    candidates.add_argument("--lr", type=argtypes.positive_float,
                            default=TrainHparams.learning_rate)
    argtypes.add_optimizer_option(candidates)
    candidates.add_argument("--batch-size", type=argtypes.positive_int,
                            default=TrainHparams.batch_size)
    candidates.add_argument("--seq-len", type=argtypes.positive_int,
                            default=TrainHparams.seq_len)


def _add_execution_options(evolve) -> None:
    cluster = evolve.add_argument_group("execution")
    cluster.add_argument("--address", help="join a Ray cluster (e.g. auto); default: embedded")
    cluster.add_argument("--workers", type=argtypes.positive_int,
                         help="candidates at once (default: all CPUs)")
    cluster.add_argument("--cpus-per-candidate", type=argtypes.positive_float,
                         default=EvolveSettings.cpus_per_candidate)
    cluster.add_argument("--gpus-per-candidate", type=argtypes.non_negative_float,
                         default=EvolveSettings.gpus_per_candidate)
    cluster.add_argument("--in-process", action="store_true",
                         help="no Ray: train candidates one at a time in this process")


def _add_faults_options(evolve) -> None:
    faults = evolve.add_argument_group("faults (Ray)")
    faults.add_argument("--max-attempts", type=argtypes.positive_int,
                        help="runs of a candidate whose worker dies or hangs (default 3)")
    faults.add_argument("--heartbeat", type=parse_duration,
                        help="how often a busy worker is asked for a heartbeat (default 10s)")
    faults.add_argument("--hang-timeout", type=parse_duration,
                        help="no heartbeat or no training progress for this long: the worker "
                             "is hung, killed and its candidate retried (default 5m)")
    faults.add_argument("--store-transfer", choices=[t.value for t in StoreTransfer],
                        default=EvolveSettings.store_transfer.value,
                        help="auto: nodes read the run's store in place when they can see it, "
                             "else get one copy per node; copy: always a node-local copy")
    faults.add_argument("--store-cache", metavar="DIR",
                        help="where nodes keep their copy of the store (default "
                             "$TMPDIR/chimera-stores)")
