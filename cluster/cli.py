"""The ``chimera`` command line. Argument parsing lives here and only here: each subcommand turns
its arguments into configs at once and calls library functions.

Expected failures (bad input) print one clear line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from chimera.config import PRESETS, ChimeraConfig, get_preset

EXIT_USAGE = 2


class CommandError(Exception):
    """A user error with a message fit to print as is."""


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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5MB', '500KB', '1.5G' or a plain number of bytes."""
    match = _SIZE.match(text)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500KB, 5MB)")
    return int(float(match[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match[2].upper()])


def _corpus_spec(args: argparse.Namespace):
    from trainers.corpus import CorpusFormat, CorpusSpec, DecodeErrors, Separator

    return CorpusSpec(source=args.corpus, format=CorpusFormat(args.format),
                      text_field=args.text_field, separator=Separator(args.separator),
                      errors=DecodeErrors(args.errors), clean_wikitext=args.clean_wikitext,
                      stories_bytes=args.corpus_size, seed=args.seed)


def _tokenizer_recipe(args: argparse.Namespace) -> str | None:
    return {"bpe": f"bpe:{args.vocab_size}", "char": "char"}.get(args.tokenizer)


def _build_tokenizer(args: argparse.Namespace, spec, console: Console):
    """A tokenizer directory to load, or 'bpe' / 'char' to train one on the corpus (unless the
    store at --out already holds one trained the same way on the same corpus)."""
    from chimera.tokenizer import load_tokenizer, train_bpe, train_char
    from trainers.corpus import iter_documents
    from trainers.store import saved_tokenizer

    recipe = _tokenizer_recipe(args)
    if recipe is None:
        return load_tokenizer(args.tokenizer)
    saved = saved_tokenizer(args.out, spec, recipe)
    if saved is not None:
        return saved
    if args.tokenizer == "bpe":
        with console.status(f"training a {args.vocab_size}-token byte-level BPE"):
            return train_bpe(iter_documents(spec), args.vocab_size)
    with console.status("building a character vocabulary"):
        return train_char(iter_documents(spec))


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
    from trainers.store import SplitConfig, StoreError, prepare_store

    try:
        spec = _corpus_spec(args)
        split = SplitConfig(val_fraction=args.val_fraction, seed=args.seed)
        tokenizer = _build_tokenizer(args, spec, console)
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task("tokenizing", total=None)
            store, reused = prepare_store(spec, tokenizer, args.out, split,
                                          progress=lambda n: progress.advance(task, n),
                                          tokenizer_recipe=_tokenizer_recipe(args))
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
    from trainers.store import StoreError, TokenStore

    try:
        store = TokenStore.open(args.store)
    except StoreError as err:
        raise CommandError(str(err)) from None
    _print_store(store, console)
    return 0


def cmd_data_stories(args: argparse.Namespace, console: Console) -> int:
    """Write the built-in story corpus, with each story's facts, as JSONL."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from trainers.stories import stories_of_size

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w") as handle:
            for story in stories_of_size(args.size, args.seed):
                handle.write(json.dumps({"text": story.text, "facts": story.facts}) + "\n")
                count += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    console.print(f"wrote {count:,} stories to {out}")
    return 0


def cmd_evolve(args: argparse.Namespace, console: Console) -> int:
    # Placeholder until the `chimera evolve` issue lands: show what the search would start from.
    console.print("[bold]chimera evolve[/bold]: the evolutionary search is not built yet "
                  "(see the `chimera evolve` issue). It will start from these presets:")
    return cmd_model_presets(args, console)


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
    prepare.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer bpe")
    prepare.add_argument("--val-fraction", type=float, default=0.05,
                         help="share of documents held out for validation")
    prepare.add_argument("--seed", type=int, default=0,
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
    stories.add_argument("--seed", type=int, default=0)
    stories.set_defaults(handler=cmd_data_stories)

    evolve = commands.add_parser("evolve", help="run an evolutionary architecture search")
    evolve.set_defaults(handler=cmd_evolve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except CommandError as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
