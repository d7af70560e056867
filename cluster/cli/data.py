"""``chimera model ...`` (presets and saved configs) and ``chimera data ...`` (corpora, tokenizers,
token stores), and the corpus options ``chimera evolve`` shares with ``data prepare``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from chimera.checkpoint import atomic_write, load_config
from chimera.config import PRESETS, ChimeraConfig, get_preset
from chimera.model import param_counts_of
from cluster.cli import argtypes
from cluster.cli.argtypes import parse_size
from cluster.cli.errors import CommandError
from trainers.corpus import CorpusFormat, CorpusSpec, DecodeErrors, Separator
from trainers.store import (
    DEFAULT_VOCAB_SIZE,
    SplitConfig,
    TokenStore,
    prepare_store,
    tokenizer_for,
    tokenizer_recipe,
)
from trainers.stories import stories_of_size


def add_corpus_options(parser, corpus: str | None) -> None:
    """The options that name a corpus and how to read it; ``corpus``: the default source
    (None: --corpus is required)."""
    parser.add_argument("--corpus", required=corpus is None, default=corpus,
                        help="a text/JSONL/Parquet file or folder, 'stories' (built-in), or "
                             "hf:NAME[:CONFIG]" + (f" (default {corpus})" if corpus else ""))
    parser.add_argument("--corpus-size", type=parse_size,
                        default=CorpusSpec.stories_bytes,
                        help="size of the built-in story corpus")
    parser.add_argument("--format", choices=[f.value for f in CorpusFormat],
                        default=CorpusSpec.format.value,
                        help="how to read files (auto: by suffix)")
    parser.add_argument("--text-field", default=CorpusSpec.text_field,
                        help="JSONL field / Parquet column")
    parser.add_argument("--separator", choices=[s.value for s in Separator],
                        default=CorpusSpec.separator.value,
                        help="text files: documents end at <|endoftext|> lines or blank lines")
    parser.add_argument("--errors", choices=[e.value for e in DecodeErrors],
                        default=CorpusSpec.errors.value,
                        help="undecodable bytes: stop with the file and offset, or replace")
    parser.add_argument("--clean-wikitext", action="store_true",
                        help="undo WikiText markup (@-@, = = Title = =)")


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _resolve_config(args: argparse.Namespace) -> ChimeraConfig:
    if args.config:
        return load_config(args.config)  # a CheckpointError is bad input: main says it
    try:
        return get_preset(args.preset)
    except ValueError as err:
        raise CommandError(str(err)) from None


def cmd_model_info(args: argparse.Namespace, console: Console) -> int:
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
    table = Table(title="Chimera presets")
    for column in ("preset", "summary", "pattern", "params", "non-embedding"):
        table.add_column(column)
    for name, config in PRESETS.items():
        counts = param_counts_of(config)
        table.add_row(name, config.summary(), config.pattern, _format_count(counts.total),
                      _format_count(counts.non_embedding))
    console.print(table)
    return 0


def corpus_spec(args: argparse.Namespace, seed: int) -> CorpusSpec:
    """The corpus the options of ``add_corpus_options`` name; ``seed`` draws the built-in
    stories."""
    return CorpusSpec(source=args.corpus, format=CorpusFormat(args.format),
                      text_field=args.text_field, separator=Separator(args.separator),
                      errors=DecodeErrors(args.errors), clean_wikitext=args.clean_wikitext,
                      stories_bytes=args.corpus_size, seed=seed)


def cmd_data_prepare(args: argparse.Namespace, console: Console) -> int:
    spec = corpus_spec(args, args.seed)
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
    store = TokenStore.open(args.store)
    store.load_tokenizer()  # the metadata and the tokenizer must agree too
    _print_store(store, console)
    return 0


def cmd_data_stories(args: argparse.Namespace, console: Console) -> int:
    """Write the built-in story corpus, with each story's facts, as JSONL."""


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


def register(commands) -> None:
    """Add ``chimera model`` and ``chimera data`` to the main parser's subcommands."""
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
    add_corpus_options(prepare, corpus=None)
    prepare.add_argument("--tokenizer", required=True,
                         help="a tokenizer directory, or 'bpe' / 'char' to train one")
    prepare.add_argument("--out", required=True, help="the store directory")
    prepare.add_argument("--vocab-size", type=argtypes.positive_int,
                         default=DEFAULT_VOCAB_SIZE, help="for --tokenizer bpe")
    prepare.add_argument("--val-fraction", type=argtypes.finite_float,
                         default=SplitConfig.val_fraction,
                         help="share of documents held out for validation")
    prepare.add_argument("--seed", type=argtypes.seed, default=SplitConfig.seed,
                         help="seed of the split (and of the built-in stories)")
    prepare.set_defaults(handler=cmd_data_prepare)
    info_store = data_commands.add_parser("info", help="describe a token store")
    info_store.add_argument("store")
    info_store.set_defaults(handler=cmd_data_info)
    stories = data_commands.add_parser("stories", help="write the built-in stories as JSONL")
    stories.add_argument("--out", required=True)
    stories.add_argument("--size", type=parse_size, default="1MB")
    stories.add_argument("--seed", type=argtypes.seed, default=0)
    stories.set_defaults(handler=cmd_data_stories)
