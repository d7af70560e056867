"""The chat fine-tune's settings, side by side on one promoted base model: does the chat model
keep the corpus (held-out bits per byte, chat / base) and does it read (held-out question
answering, base vs chat)?

Each setting fine-tunes the same base model (``PROMOTED/base``) exactly as ``chimera promote``'s
fine-tuning stage does (the same conversations from the run's corpus, the same mix of plain
training text, the same trainer), then scores it as the evaluation stage does: bits per byte of
the store's validation windows, and the held-out questions (from the run's validation documents,
or the generator's held-out stories for the built-in corpus). A setting is
``steps=N,mix=F,lr=X`` (any left out: the promote defaults).

    python bench/chat_tuning.py RUN/promoted --run RUN                      # the defaults
    python bench/chat_tuning.py RUN/promoted --run RUN --settings steps=400,mix=0.5,lr=1e-3 \\
        steps=400,mix=0.25,lr=3e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from chimera.checkpoint import load_model, save_model  # noqa: E402
from chimera.inference import TOKENIZER_DIR  # noqa: E402
from cluster.app.promote import BASE_DIR, PromoteSettings  # noqa: E402
from cluster.app.promote.instruction_data import (  # noqa: E402
    heldout_bpb,
    question_source,
    run_store,
    sft_conversations,
    validation_conversations,
)
from cluster.app.promote.settings import winner  # noqa: E402
from cluster.app.promote.stages import run_sft  # noqa: E402
from trainers.recipe import TrainHparams  # noqa: E402
from trainers.sft import (  # noqa: E402
    QA_NEW_TOKENS,
    ensure_chat_tokens,
    qa_accuracy,
)

KEYS = {"steps": ("sft_steps", int), "mix": ("pretrain_mix", float), "lr": (None, float)}


def setting(text: str, defaults: PromoteSettings) -> PromoteSettings:
    """``steps=N,mix=F,lr=X`` as promote settings (each key left out keeps its default)."""
    changes, lr = {}, None
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--settings {text!r}: unknown key {key!r}; use {', '.join(KEYS)}")
        field, kind = KEYS[key]
        try:
            parsed = kind(value)
        except ValueError:
            raise SystemExit(f"--settings {text!r}: {key}={value!r} is not a number") from None
        if field is None:
            lr = parsed
        else:
            changes[field] = parsed
    if lr is not None:
        changes["sft_hparams"] = dataclasses.replace(defaults.sft_hparams, learning_rate=lr)
    return dataclasses.replace(defaults, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("promoted", type=Path, help="a model directory of chimera promote")
    parser.add_argument("--run", required=True, help="the run directory it was promoted from")
    parser.add_argument("--settings", nargs="+", default=[""],
                        help="steps=N,mix=F,lr=X per setting (default: the promote defaults)")
    parser.add_argument("--save", type=Path, default=None,
                        help="keep the chat model of each setting: SAVE/<setting> (a model "
                             "directory, e.g. for bench/preference.py)")
    args = parser.parse_args()
    console = Console()
    defaults = PromoteSettings(run_dir=args.run)
    _, _, run = winner(args.run, None)
    store = run_store(defaults)
    tokenizer = store.load_tokenizer()
    pretrained = TrainHparams(**json.loads((args.promoted / "metrics.json").read_text())
                              ["hparams"])
    base = load_model(args.promoted / BASE_DIR)
    base_bpb = heldout_bpb(base, store, pretrained)
    items = question_source(defaults, run, store, tokenizer)(defaults.qa_questions,
                                                              defaults.seed)
    base_for_chat, _ = ensure_chat_tokens(load_model(args.promoted / BASE_DIR), tokenizer)
    base_qa = qa_accuracy(base_for_chat, tokenizer, items, QA_NEW_TOKENS,
                          context=defaults.max_seq_len)
    table = Table(title=f"chat fine-tuning of {args.promoted} (base: {base_bpb:.4f} bpb, "
                        f"question answering {base_qa:.0%} of {len(items)})")
    for column in ("steps", "mix", "lr", "chat bpb", "chat / base", "QA chat", "seconds"):
        table.add_column(column, justify="right")
    for text in args.settings:
        settings = setting(text, defaults)
        began = time.time()
        train = sft_conversations(settings, run, store, tokenizer, settings.sft_conversations)
        val = sft_conversations(settings, run, store, tokenizer,
                                validation_conversations(settings), heldout=True)
        with tempfile.TemporaryDirectory(prefix="chimera-chat-tuning-") as out:
            chat, _, _ = run_sft(load_model(args.promoted / BASE_DIR), tokenizer, train, val,
                                 settings.sft_hparams, settings.sft_steps, Path(out), console,
                                 settings.seed, "cpu", store, settings.pretrain_mix)
        seconds = time.time() - began
        if args.save is not None:
            kept = args.save / (text or "defaults")
            save_model(chat, kept)
            tokenizer.save_pretrained(str(kept / TOKENIZER_DIR))
        chat_bpb = heldout_bpb(chat, store, pretrained)
        chat_qa = qa_accuracy(chat, tokenizer, items, QA_NEW_TOKENS, context=settings.max_seq_len)
        table.add_row(str(settings.sft_steps), f"{settings.pretrain_mix:g}",
                      f"{settings.sft_hparams.learning_rate:g}", f"{chat_bpb:.4f}",
                      f"{chat_bpb / base_bpb:.3f}", f"{chat_qa:.0%}", f"{seconds:.0f}")
        console.print(table)


if __name__ == "__main__":
    main()
