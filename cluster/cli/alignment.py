"""``chimera dpo`` (preference-tune a chat model) and ``chimera preferences`` (write the
preference pairs a run's corpus gives, as JSONL in TRL's format)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from cluster.app.dpo import run_dpo
from cluster.app.promote.instruction_data import run_preferences
from cluster.cli import argtypes
from cluster.cli.errors import CommandError
from trainers.dpo import LOSS_TYPES, DpoSettings
from trainers.preferences import read_preferences, write_preferences

HELDOUT_SHARE = 20  # with --data and no --val, one pair in this many is held out


def _pairs(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """Training and held-out pairs: from --data (and --val), else from --run's corpus."""
    if args.data:
        train = read_preferences(args.data)
        if args.val:
            return train, read_preferences(args.val), str(args.data)
        if len(train) < 2:
            raise CommandError(f"--data {args.data}: {len(train)} pair; give --val, or at "
                               f"least 2 pairs so that some are held out")
        cut = max(1, len(train) // HELDOUT_SHARE)
        return train[:-cut], train[-cut:], str(args.data)
    train, source = run_preferences(args.run, args.pairs, args.seed, False, args.max_length,
                                    with_answers=True)  # what --own-mistakes judges by
    heldout, _ = run_preferences(args.run, max(64, args.pairs // HELDOUT_SHARE), args.seed,
                                 True, args.max_length)
    return train, heldout, source


def cmd_dpo(args: argparse.Namespace, console: Console) -> int:
    # On by default where the pairs carry their answers (built here), off for --data's.
    own_mistakes = not args.data if args.own_mistakes is None else args.own_mistakes
    try:
        settings = DpoSettings(steps=args.steps, batch_size=args.batch_size,
                               learning_rate=args.lr, beta=args.beta, loss_type=args.loss,
                               sft_weight=args.sft_weight, own_mistakes=own_mistakes,
                               max_length=args.max_length,
                               checkpoint_every=args.checkpoint_every, seed=args.seed)
    except ValueError as err:
        raise CommandError(str(err)) from None
    if args.own_mistakes and args.data:
        raise CommandError(f"--own-mistakes with --data {args.data}: its pairs carry no "
                           f"expected answer to judge the model's replies by; build the pairs "
                           f"from a run (--run) or the built-in stories instead")
    train, heldout, source = _pairs(args)
    console.print(f"[bold]dpo[/bold] {args.model}: {len(train):,} training pairs ({source}), "
                  f"{len(heldout):,} held out -> {args.out}", highlight=False)
    metrics = run_dpo(args.model, args.out, train, heldout, settings, console, args.device,
                      source)
    before, after = metrics["heldout"]["before"], metrics["heldout"]["after"]
    console.print(f"[bold green]done[/bold green]: {metrics['steps']} steps in "
                  f"{metrics['seconds'] / 60:.1f} min; held-out preference accuracy "
                  f"{before['accuracy']:.1%} -> {after['accuracy']:.1%} (margin "
                  f"{before['margin']:.3f} -> {after['margin']:.3f} nats); report "
                  f"{Path(args.out) / 'dpo.md'}", highlight=False)
    return 0


def cmd_preferences(args: argparse.Namespace, console: Console) -> int:
    records, source = run_preferences(args.run, args.pairs, args.seed, args.heldout,
                                      args.max_length)
    write_preferences(records, args.out)
    console.print(f"wrote {len(records):,} {'held-out ' if args.heldout else ''}preference "
                  f"pairs ({source}) to {args.out}", highlight=False)
    return 0


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None,
                        help="a run directory: pairs from its corpus (default: the built-in "
                             "stories)")
    parser.add_argument("--pairs", type=argtypes.positive_int, default=2000,
                        help="how many training pairs to build")
    parser.add_argument("--seed", type=argtypes.seed, default=0)
    parser.add_argument("--max-length", type=argtypes.positive_int,
                        default=DpoSettings.max_length,
                        help="tokens of prompt and reply; passages are cut to fit")


def register(commands) -> None:
    """Add ``chimera dpo`` and ``chimera preferences`` to the main parser."""
    dpo = commands.add_parser(
        "dpo", help="preference-tune a chat model (TRL's DPO and relatives)",
        description="Direct preference optimisation of a chat model directory against a "
                    "frozen copy of itself, on pairs of a chosen and a rejected reply (JSONL "
                    "in TRL's format, or built from a run's corpus). Resumes from OUT's "
                    "checkpoints when run again.")
    dpo.add_argument("model", metavar="MODEL", help="a chat model directory")
    dpo.add_argument("--out", required=True, help="the tuned model directory")
    dpo.add_argument("--data", default=None,
                     help="preference pairs (JSONL: prompt, chosen, rejected)")
    dpo.add_argument("--val", default=None, help="held-out pairs (default: 1 in 20 of --data)")
    _add_source(dpo)
    dpo.add_argument("--steps", type=argtypes.positive_int, default=DpoSettings.steps)
    dpo.add_argument("--batch-size", type=argtypes.positive_int,
                     default=DpoSettings.batch_size)
    dpo.add_argument("--lr", type=argtypes.positive_float, default=DpoSettings.learning_rate)
    dpo.add_argument("--beta", type=argtypes.positive_float, default=DpoSettings.beta)
    dpo.add_argument("--loss", choices=LOSS_TYPES, default=DpoSettings.loss_type)
    dpo.add_argument("--sft-weight", type=argtypes.non_negative_float,
                     default=DpoSettings.sft_weight,
                     help="add the chosen reply's NLL with this weight (RPO); 0: plain DPO "
                          "(default: %(default)s)")
    dpo.add_argument("--own-mistakes", action=argparse.BooleanOptionalAction, default=None,
                     help="rejected = the model's own wrong answer to the training question "
                          "where it gives one (it answers each first); needs pairs built from "
                          "--run or the built-in stories (default: on for those, off with "
                          "--data)")
    dpo.add_argument("--checkpoint-every", type=argtypes.positive_int,
                     default=DpoSettings.checkpoint_every)
    dpo.add_argument("--device", default="cpu")
    dpo.set_defaults(handler=cmd_dpo)

    prefs = commands.add_parser(
        "preferences", help="write preference pairs from a run's corpus (JSONL)",
        description="Reading questions about the corpus's documents: chosen = the answer the "
                    "document supports, rejected = a plausible wrong one (another character, "
                    "place or object of the same document, or of another).")
    prefs.add_argument("--out", required=True, help="the JSONL file to write")
    prefs.add_argument("--heldout", action="store_true",
                       help="from the held-out documents (for evaluation)")
    _add_source(prefs)
    prefs.set_defaults(handler=cmd_preferences)
