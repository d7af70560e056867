"""Preference tuning, side by side: the base model, its chat fine-tune (SFT) and SFT + DPO in
one or more settings, each scored on the same held-out questions: question answering (greedy
reply names the answer, as promote's evaluation scores it), preference accuracy (the chosen
reply likelier than the rejected one), and held-out bits per byte (does it keep the corpus).

DPO trains on pairs from the run's training documents (or the generator's training stories)
exactly as ``chimera dpo --run RUN`` builds them; a setting is ``steps=N,lr=X,beta=B,
loss=L,sft=W,seed=S,own=1`` (any left out: the ``chimera dpo`` defaults; ``own=1``: the SFT
model's own wrong answers as the rejected replies, ``trainers.dpo.with_own_mistakes``). QA is
compared with the SFT model's question by question (a sign test on the ones that changed).

    python bench/chat_tuning.py RUN/promoted --run RUN --save SFT     # an SFT model to tune
    python bench/preference.py RUN/promoted --sft SFT/defaults --run RUN \\
        --settings "" lr=1e-3 steps=400,sft=0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from chimera.checkpoint import load_model  # noqa: E402
from cluster.app.promote import BASE_DIR, PromoteSettings  # noqa: E402
from cluster.app.promote.instruction_data import (  # noqa: E402
    heldout_bpb,
    question_source,
    run_preferences,
    run_store,
)
from cluster.app.promote.settings import winner  # noqa: E402
from cluster.app.promote.stages import DpoProgress  # noqa: E402
from trainers.dpo import (  # noqa: E402
    DpoSettings,
    preference_accuracy,
    preference_tune,
    training_pairs,
)
from trainers.recipe import TrainHparams  # noqa: E402
from trainers.sft import (  # noqa: E402
    QA_NEW_TOKENS,
    ensure_chat_tokens,
    qa_answers_right,
)

KEYS = {"steps": ("steps", int), "lr": ("learning_rate", float), "beta": ("beta", float),
        "loss": ("loss_type", str), "sft": ("sft_weight", float),
        "batch": ("batch_size", int), "seed": ("seed", int),
        "own": ("own_mistakes", lambda value: value not in ("0", "", "false"))}


def setting(text: str) -> DpoSettings:
    changes = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--settings {text!r}: unknown key {key!r}; use {', '.join(KEYS)}")
        name, kind = KEYS[key]
        changes[name] = kind(value)
    return dataclasses.replace(DpoSettings(), **changes)


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between questions
    one model alone gets right and questions the other alone gets right, were they equal."""
    flips = gained + lost
    tail = sum(math.comb(flips, k) for k in range(min(gained, lost) + 1)) / 2 ** flips
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("promoted", type=Path, help="a model directory of chimera promote")
    parser.add_argument("--sft", type=Path, default=None,
                        help="the chat model to tune (default: PROMOTED itself)")
    parser.add_argument("--run", required=True, help="the run directory it was promoted from")
    parser.add_argument("--settings", nargs="+", default=[""],
                        help="steps=N,lr=X,beta=B,loss=L,sft=W per DPO setting")
    parser.add_argument("--pairs", type=int, default=2000, help="DPO training pairs")
    parser.add_argument("--questions", type=int, default=300,
                        help="held-out questions (and pairs): at 80%% accuracy, 300 give a "
                             "standard error of 2.3 points, and all rows share them (paired)")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log gets whole rows
    defaults = PromoteSettings(run_dir=args.run, qa_questions=args.questions)
    _, _, run = winner(args.run, None)
    store = run_store(defaults)
    tokenizer = store.load_tokenizer()
    pretrained = TrainHparams(**json.loads((args.promoted / "metrics.json").read_text())
                              ["hparams"])
    items = question_source(defaults, run, store, tokenizer)(defaults.qa_questions,
                                                              defaults.seed)
    heldout, source = run_preferences(args.run, defaults.qa_questions, defaults.seed, True,
                                      defaults.max_seq_len)
    train, _ = run_preferences(args.run, args.pairs, defaults.seed, False, defaults.max_seq_len,
                               with_answers=True)
    table = Table(title=f"preference tuning on {source}: {len(items)} held-out questions, "
                        f"{len(heldout)} held-out pairs, {len(train)} training pairs")
    for column in ("model", "QA", "QA vs SFT: +right -wrong (p)", "preference acc",
                   "margin (nats)", "held-out bpb", "DPO seconds"):
        table.add_column(column, justify="right")
    answers: dict[str, list[bool]] = {}

    def row(name: str, model, seconds: str = "") -> None:
        prefs = preference_accuracy(model, tokenizer, heldout)
        right = answers[name] = qa_answers_right(model, tokenizer, items, QA_NEW_TOKENS,
                                                 context=defaults.max_seq_len)
        versus = ""
        if "SFT" in answers and name != "SFT":
            gained = sum(r and not s for r, s in zip(right, answers["SFT"]))
            lost = sum(s and not r for r, s in zip(right, answers["SFT"]))
            versus = f"+{gained} -{lost} ({sign_test(gained, lost):.2f})"
        table.add_row(name, f"{sum(right) / len(right):.0%}", versus,
                      f"{prefs['accuracy']:.1%}", f"{prefs['margin']:.2f}",
                      f"{heldout_bpb(model, store, pretrained):.4f}", seconds)
        console.print(table)

    base, _ = ensure_chat_tokens(load_model(args.promoted / BASE_DIR), tokenizer)
    row("base", base.eval())
    sft_dir = args.sft or args.promoted
    row("SFT", load_model(sft_dir).eval())
    with tempfile.TemporaryDirectory(prefix="chimera-preference-") as work:
        for text in args.settings:
            settings = setting(text)
            with DpoProgress(console, settings.steps) as progress:
                began = time.time()
                # Mined once per SFT model: later settings read the pairs back (0 s).
                pairs, own = training_pairs(load_model(sft_dir), tokenizer, train, settings,
                                            Path(work) / f"pairs-{settings.own_mistakes}.jsonl",
                                            on_answer=progress.answering)
                if own is not None:
                    console.print(f"own mistakes: {own} of {len(pairs)} training replies of "
                                  f"the SFT model wrong ({time.time() - began:.0f} s to answer)")
                tuned, result = preference_tune(load_model(sft_dir), tokenizer, pairs, settings,
                                                Path(work) / "checkpoints", on_progress=progress)
            shutil.rmtree(Path(work) / "checkpoints")
            row(f"SFT + DPO {text or '(defaults)'}", tuned, f"{result.seconds:.0f}")

if __name__ == "__main__":
    main()
