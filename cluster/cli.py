"""The ``chimera`` command line. Argument parsing lives here and only here: each subcommand turns
its arguments into configs at once and calls library functions.

Expected failures (bad input) print one clear line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from chimera.config import PRESETS, ChimeraConfig, get_preset
from cluster import argtypes
from cluster import model_commands as model_cli
from cluster.argtypes import parse_duration, parse_flops, parse_size  # noqa: F401 - re-exported
from cluster.errors import CommandError, user_errors

EXIT_USAGE = 2
DEFAULT_BUDGET_SECONDS = 180.0
DEFAULT_CANDIDATE_TOKENS = 100_000


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _resolve_config(args: argparse.Namespace) -> ChimeraConfig:
    if args.config:
        from chimera.checkpoint import CheckpointError, load_config

        try:
            return load_config(args.config)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
    try:
        return get_preset(args.preset)
    except ValueError as err:
        raise CommandError(str(err)) from None


def cmd_model_info(args: argparse.Namespace, console: Console) -> int:
    from chimera.model import param_counts_of

    config = _resolve_config(args)
    counts = param_counts_of(config)
    table = Table(title=f"Chimera {args.preset or args.config}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("summary", config.summary())
    table.add_row("layer pattern", f"{config.pattern}  ({config.pattern.count('R')} recurrent, "
                                   f"{config.pattern.count('A')} attention)")
    table.add_row("parameters", f"{_format_count(counts.total)} ({counts.total:,})")
    table.add_row("  embedding", f"{_format_count(counts.embedding)} ({counts.embedding:,})")
    table.add_row("  non-embedding",
                  f"{_format_count(counts.non_embedding)} ({counts.non_embedding:,})")
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


def cmd_model_presets(args: argparse.Namespace, console: Console) -> int:
    from chimera.model import param_counts_of

    table = Table(title="Chimera presets")
    for column in ("preset", "summary", "pattern", "params", "non-embedding"):
        table.add_column(column)
    for name, config in PRESETS.items():
        counts = param_counts_of(config)
        table.add_row(name, config.summary(), config.pattern, _format_count(counts.total),
                      _format_count(counts.non_embedding))
    console.print(table)
    return 0


def _corpus_spec(args: argparse.Namespace, seed: int):
    """The corpus the options name; ``seed`` draws the built-in stories."""
    from trainers.corpus import CorpusFormat, CorpusSpec, DecodeErrors, Separator

    return CorpusSpec(source=args.corpus, format=CorpusFormat(args.format),
                      text_field=args.text_field, separator=Separator(args.separator),
                      errors=DecodeErrors(args.errors), clean_wikitext=args.clean_wikitext,
                      stories_bytes=args.corpus_size, seed=seed)


def cmd_data_prepare(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from chimera.tokenizer import TokenizerError
    from trainers.corpus import CorpusError
    from trainers.store import (
        SplitConfig,
        StoreError,
        prepare_store,
        tokenizer_for,
        tokenizer_recipe,
    )

    try:
        spec = _corpus_spec(args, args.seed)
        split = SplitConfig(val_fraction=args.val_fraction, seed=args.seed)
        with console.status(f"preparing the {args.tokenizer} tokenizer"):
            tokenizer = tokenizer_for(spec, args.tokenizer, args.vocab_size, args.out)
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task("tokenizing", total=None)
            store, reused = prepare_store(spec, tokenizer, args.out, split,
                                          progress=lambda n: progress.advance(task, n),
                                          tokenizer_recipe=tokenizer_recipe(
                                              args.tokenizer, args.vocab_size))
    except (CorpusError, TokenizerError, StoreError) as err:
        raise CommandError(str(err)) from None
    verb = "reused the existing store at" if reused else "wrote"
    console.print(f"{verb} {store.root}")
    _print_store(store, console)
    return 0


def _print_store(store, console: Console) -> None:
    table = Table(title=f"token store {store.root}")
    for column in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(column, justify="right")
    for name in ("train", "val"):
        info = store.info(name)
        table.add_row(name, f"{info.documents:,}", f"{info.tokens:,}", f"{info.bytes:,}",
                      f"{info.bytes_per_token:.3f}")
    console.print(table)
    meta = store.meta
    console.print(f"corpus {meta['corpus']} ({meta['corpus_fingerprint']}), vocabulary "
                  f"{meta['vocab_size']:,} as {meta['token_dtype']}, tokenizer "
                  f"{meta['tokenizer_fingerprint']}", highlight=False)


def cmd_data_info(args: argparse.Namespace, console: Console) -> int:
    from trainers.store import TokenStore

    store = TokenStore.open(args.store)
    store.load_tokenizer()  # the metadata and the tokenizer must agree too
    _print_store(store, console)
    return 0


def cmd_data_stories(args: argparse.Namespace, console: Console) -> int:
    """Write the built-in story corpus, with each story's facts, as JSONL."""
    import json

    from chimera.checkpoint import atomic_write
    from trainers.stories import stories_of_size

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "w") as handle:
            for story in stories_of_size(args.size, args.seed):
                handle.write(json.dumps({"text": story.text, "facts": story.facts}) + "\n")
                count += 1

    atomic_write(out, write)
    console.print(f"wrote {count:,} stories to {out}")
    return 0


def _evolve_settings(args: argparse.Namespace):
    import dataclasses

    from cluster.evolve import EvolveSettings, check_new_run_dir, load_settings
    from cluster.node_store import DEFAULT_CACHE_ROOT, StoreTransfer
    from cluster.worker import FaultPolicy
    from search.evolution import EvolutionConfig
    from search.genome import get_space
    from search.hurdles import Hurdles
    from search.loop import SearchLimits
    from search.objectives import Objectives
    from trainers.candidate import BudgetKind, TrainBudget, TrainHparams

    wall = args.budget
    if wall is None and args.max_candidates is None and args.max_generations is None \
            and args.flops is None:
        wall = DEFAULT_BUDGET_SECONDS
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
    get_space(args.space)  # fail early on a bad name
    kind, amount = next(((k, v) for k, v in ((BudgetKind.TOKENS, args.candidate_tokens),
                                             (BudgetKind.STEPS, args.candidate_steps),
                                             (BudgetKind.SECONDS, args.candidate_seconds))
                         if v is not None), (BudgetKind.TOKENS, DEFAULT_CANDIDATE_TOKENS))
    run_dir = args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_run_dir(run_dir)  # never overwrite a run, or mix a new one into another's files
    return EvolveSettings(
        run_dir=run_dir, corpus=_corpus_spec(args, args.data_seed), tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, space=args.space,
        evolution=EvolutionConfig(population_size=args.population,
                                  tournament_size=args.tournament,
                                  gene_pool_fraction=args.gene_pool),
        limits=limits, candidate_budget=TrainBudget(kind, amount),
        hparams=TrainHparams(learning_rate=args.lr, batch_size=args.batch_size,
                             seq_len=args.seq_len),
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


def _fault_policy(args: argparse.Namespace, base):
    """``base`` with the fault options given on the command line."""
    import dataclasses

    given = {field: value for field, value in (("max_attempts", args.max_attempts),
                                               ("heartbeat_seconds", args.heartbeat),
                                               ("hang_seconds", args.hang_timeout))
             if value is not None}
    return dataclasses.replace(base, **given)


def cmd_evolve(args: argparse.Namespace, console: Console) -> int:
    from chimera.tokenizer import TokenizerError
    from cluster.evolve import print_outcome, run_evolve
    from trainers.corpus import CorpusError
    from trainers.store import StoreError

    try:
        settings = _evolve_settings(args)
        console.print(f"[bold]chimera evolve[/bold] -> {settings.run_dir} "
                      f"({settings.space} space, candidates train "
                      f"{settings.candidate_budget.describe()} each)")
        outcome = run_evolve(settings, console, live=not args.no_live)
    except (CorpusError, TokenizerError, StoreError, ValueError, FileNotFoundError) as err:
        raise CommandError(str(err)) from None
    print_outcome(outcome, settings.run_dir, console)
    return 130 if outcome.report.stop_reason == "interrupted" else 0


def _open_run(run: str):
    """The run database of a run directory, a results.db file or a database URL, read-only."""
    from cluster.evolve import DATABASE_FILE, load_settings
    from results.db import RunDatabase

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
    from chimera.checkpoint import atomic_write
    from results.export import write_parquet

    db = _open_run(args.run)
    out = Path(args.parquet)
    try:
        rows = db.candidates()
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

    from chimera.checkpoint import atomic_write
    from results.plots import best_so_far_figure, fully_trained, lineage_figure, pareto_figure
    from search.pareto import pareto_front

    db = _open_run(args.run)
    try:
        rows, leaders, rungs = db.candidates(), db.leaderboard(1), db.rungs()
    finally:
        db.close()
    if not leaders:
        raise CommandError(f"{args.run}: no candidate has finished ok yet; nothing to plot")
    if args.flops and not any(row.get("train_flops") for row in rows):
        raise CommandError(f"{args.run}: no training FLOPs recorded (a run made before they "
                           f"were); plot it without --flops")
    ok = fully_trained(rows, rungs)
    front = {ok[i]["id"] for i in pareto_front([(r["val_bpb"], r["params"]) for r in ok])}
    out = Path(args.out or (Path(args.run) / "plots" if Path(args.run).is_dir() else "plots"))
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.run).parent.name if args.run.endswith(".db") else Path(args.run).name
    figures = {"best_so_far.png": best_so_far_figure(rows, f"best so far: {name}", rungs,
                                                     flops=args.flops),
               "pareto.png": pareto_figure(ok, front, f"bpb against parameters: {name}"),
               "lineage.png": lineage_figure(rows, leaders[0]["id"])}
    for name, figure in figures.items():
        atomic_write(out / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=120))
        plt.close(figure)
        console.print(f"wrote {out / name}", highlight=False)
    return 0


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    import json

    from rich.live import Live

    from results.leaderboard import counts_line, leaderboard_table

    db = _open_run(args.run)

    def render():
        return Group(leaderboard_table(db.leaderboard(args.top), f"top {args.top} of {args.run}"),
                     counts_line(db.counts()))

    if args.json:
        rows = db.leaderboard(args.top)
        for row in rows:
            row["genome"], row["parents"] = json.loads(row["genome"]), json.loads(row["parents"])
            row.pop("result", None)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera",
        description="Distributed evolutionary search for small hybrid recurrent/attention "
                    "language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = commands.add_parser("model", help="inspect model configurations")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = model_commands.add_parser("info", help="layer pattern and parameter counts")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in preset")
    source.add_argument("--config", metavar="MODEL_DIR", help="a saved model directory")
    info.set_defaults(handler=cmd_model_info)
    presets = model_commands.add_parser("presets", help="list the built-in presets")
    presets.set_defaults(handler=cmd_model_presets)

    data = commands.add_parser("data", help="corpora, tokenizers and token stores")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = data_commands.add_parser(
        "prepare", help="tokenize a corpus into an Arrow token store",
        description="Tokenize a corpus into an Arrow token store. Running it again with the "
                    "same inputs reuses the store.")
    prepare.add_argument("--corpus", required=True,
                         help="a text/JSONL/Parquet file or folder, 'stories' (built-in), or "
                              "hf:NAME[:CONFIG]")
    prepare.add_argument("--tokenizer", required=True,
                         help="a tokenizer directory, or 'bpe' / 'char' to train one")
    prepare.add_argument("--out", required=True, help="the store directory")
    prepare.add_argument("--vocab-size", type=argtypes.positive_int, default=4096,
                         help="for --tokenizer bpe")
    prepare.add_argument("--val-fraction", type=argtypes.finite_float, default=0.05,
                         help="share of documents held out for validation")
    prepare.add_argument("--seed", type=argtypes.seed, default=0,
                         help="seed of the split (and of the built-in stories)")
    prepare.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"],
                         default="auto", help="how to read files (auto: by suffix)")
    prepare.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    prepare.add_argument("--separator", choices=["eot", "blank"], default="eot",
                         help="text files: documents end at <|endoftext|> lines or blank lines")
    prepare.add_argument("--errors", choices=["strict", "replace"], default="strict",
                         help="undecodable bytes: stop with the file and offset, or replace")
    prepare.add_argument("--clean-wikitext", action="store_true",
                         help="undo WikiText markup (@-@, = = Title = =)")
    prepare.add_argument("--corpus-size", type=parse_size, default="2MB",
                         help="size of the built-in story corpus")
    prepare.set_defaults(handler=cmd_data_prepare)
    info_store = data_commands.add_parser("info", help="describe a token store")
    info_store.add_argument("store")
    info_store.set_defaults(handler=cmd_data_info)
    stories = data_commands.add_parser("stories", help="write the built-in stories as JSONL")
    stories.add_argument("--out", required=True)
    stories.add_argument("--size", type=parse_size, default="1MB")
    stories.add_argument("--seed", type=argtypes.seed, default=0)
    stories.set_defaults(handler=cmd_data_stories)

    evolve = commands.add_parser(
        "evolve", help="run an evolutionary architecture search",
        description="Aging evolution over Chimera architectures, candidates trained on Ray "
                    "workers, results in RUN_DIR/results.db, a live leaderboard.")
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
    run = evolve.add_argument_group("run")
    run.add_argument("--run-dir", help="where the run lives (default runs/<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    run.add_argument("--seed", type=argtypes.seed, default=0,
                     help="seed of the search (proposals, initial weights, batch order)")
    run.add_argument("--no-live", action="store_true", help="no live display")
    run.add_argument("--database", metavar="URL",
                     help="a SQLAlchemy URL for the results (default: RUN_DIR/results.db)")
    data = evolve.add_argument_group("data (default: the built-in story corpus)")
    data.add_argument("--corpus", default="stories")
    data.add_argument("--corpus-size", type=parse_size, default="2MB")
    data.add_argument("--tokenizer", default="bpe", help="bpe, char or a tokenizer directory")
    data.add_argument("--vocab-size", type=argtypes.positive_int, default=1024)
    data.add_argument("--data-seed", type=argtypes.seed, default=0,
                      help="seed of the built-in stories and the train/validation split, apart "
                           "from --seed so that runs with different seeds share a validation "
                           "set (default 0)")
    data.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"], default="auto")
    data.add_argument("--text-field", default="text")
    data.add_argument("--separator", choices=["eot", "blank"], default="eot")
    data.add_argument("--errors", choices=["strict", "replace"], default="strict")
    data.add_argument("--clean-wikitext", action="store_true")
    search = evolve.add_argument_group("search")
    search.add_argument("--space", default="cpu", help="cpu (default) or published")
    search.add_argument("--strategy", default="evolution",
                        choices=["evolution", "random", "tpe", "nsga2"],
                        help="aging evolution (default), or a baseline: random search, "
                             "Optuna TPE, Optuna NSGA-II")
    search.add_argument("--population", type=argtypes.positive_int, default=16)
    search.add_argument("--tournament", type=argtypes.positive_int, default=4)
    search.add_argument("--gene-pool", type=argtypes.non_negative_float, default=0.0,
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
    search.add_argument("--hurdle-factor", type=argtypes.positive_float, default=2.0,
                        help="each rung trains this many times longer in total than the last "
                             "(default 2: shorter first rungs rank candidates poorly)")
    search.add_argument("--objective", default="bpb",
                        help="what to minimise: bpb, or several for a Pareto search, e.g. "
                             "bpb,params or bpb,params,throughput")
    search.add_argument("--max-params", type=argtypes.positive_int,
                        help="parameter budget (candidates are shrunk to fit)")
    search.add_argument("--hurdle-keep", type=argtypes.positive_float, default=1 / 3,
                        help="share of a rung's results that continue (default 1/3)")
    search.add_argument("--hurdle-window", type=argtypes.positive_int, metavar="N",
                        help="set each rung's bar from its last N results, so it rises with an "
                             "improving population (default: all results so far)")
    candidates = evolve.add_argument_group("candidate training")
    per = candidates.add_mutually_exclusive_group()
    per.add_argument("--candidate-tokens", type=argtypes.positive_int)
    per.add_argument("--candidate-steps", type=argtypes.positive_int)
    per.add_argument("--candidate-seconds", type=argtypes.positive_float)
    candidates.add_argument("--lr", type=argtypes.positive_float, default=3e-3)
    candidates.add_argument("--batch-size", type=argtypes.positive_int, default=16)
    candidates.add_argument("--seq-len", type=argtypes.positive_int, default=128)
    cluster = evolve.add_argument_group("execution")
    cluster.add_argument("--address", help="join a Ray cluster (e.g. auto); default: embedded")
    cluster.add_argument("--workers", type=argtypes.positive_int,
                         help="candidates at once (default: all CPUs)")
    cluster.add_argument("--cpus-per-candidate", type=argtypes.positive_float, default=1.0)
    cluster.add_argument("--gpus-per-candidate", type=argtypes.non_negative_float, default=0.0)
    cluster.add_argument("--in-process", action="store_true",
                         help="no Ray: train candidates one at a time in this process")
    faults = evolve.add_argument_group("faults (Ray)")
    faults.add_argument("--max-attempts", type=argtypes.positive_int,
                        help="runs of a candidate whose worker dies or hangs (default 3)")
    faults.add_argument("--heartbeat", type=parse_duration,
                        help="how often a busy worker is asked for a heartbeat (default 10s)")
    faults.add_argument("--hang-timeout", type=parse_duration,
                        help="no heartbeat or no training progress for this long: the worker "
                             "is hung, killed and its candidate retried (default 5m)")
    faults.add_argument("--store-transfer", choices=["auto", "copy"], default="auto",
                        help="auto: nodes read the run's store in place when they can see it, "
                             "else get one copy per node; copy: always a node-local copy")
    faults.add_argument("--store-cache", metavar="DIR",
                        help="where nodes keep their copy of the store (default "
                             "$TMPDIR/chimera-stores)")
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
    model_cli.register(commands, parse_size)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - only bad input is caught; a bug is re-raised
        message = _user_message(err)
        if message is None or os.environ.get("CHIMERA_DEBUG"):
            raise
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
        return EXIT_USAGE


def _user_message(err: Exception) -> str | None:
    """The one line to print for bad input (a flag, a file, a URL) or a file-system refusal;
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(err, user_errors()):
        return str(err)
    if isinstance(err, OSError) and err.strerror:  # permissions, a full disk, a missing path
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return None


if __name__ == "__main__":
    sys.exit(main())
