"""``chimera eval``: score a model directory with lm-evaluation-harness on Chimera's held-out
tasks (``cluster.app.harness``), or on standard harness tasks named with ``--tasks``.

Registered on the main parser by ``cluster.cli.main``. The task folder it writes reruns with the
harness's own command line (its README.md gives it), so the numbers can be checked by anyone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.app.harness import (
    DEFAULT_TASKS,
    OUR_TASKS,
    QUESTIONS,
    TASK_DIR,
    TEXTS,
    HarnessError,
    result_rows,
    run_harness,
    write_tasks,
)
from cluster.cli import argtypes
from cluster.cli.errors import CommandError

EVAL_DIR = "eval"  # MODEL/eval unless --out


def task_list(text: str) -> list[str]:
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise argparse.ArgumentTypeError(f"no task named in {text!r}")
    return tasks


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    model = Path(args.model)
    out = Path(args.out) if args.out else model / EVAL_DIR
    ours = [t for t in args.tasks if t in OUR_TASKS]
    typo = next((t for t in args.tasks if t.startswith("chimera_") and t not in OUR_TASKS),
                None)
    if typo is not None:  # ours by name, not the harness's: say so before any loading
        raise CommandError(f"unknown task {typo!r}: Chimera's tasks are {', '.join(OUR_TASKS)}")
    task_dir = out / TASK_DIR
    try:
        if ours:
            written = write_tasks(model, task_dir, args.run, args.questions, args.texts,
                                  args.seed, ours)
            console.print(f"tasks from {written['source']}: " + ", ".join(
                f"{name} ({n} items)" for name, n in written["tasks"].items()), highlight=False)
        results = run_harness(model, args.tasks, task_dir, args.limit, args.batch_size,
                              args.device, out_dir=out)
    except HarnessError as err:
        raise CommandError(str(err)) from None
    table = Table(title=f"lm-evaluation-harness on {model}")
    for column in ("task", "metric", "value", "stderr", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metric, value, stderr, n in result_rows(results):
        table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                      "" if n is None else str(n))
    console.print(table)
    console.print(f"results -> {out / 'lm_eval.json'}, {out / 'lm_eval.md'}; tasks -> "
                  f"{task_dir} (its README.md gives the harness's own command)",
                  highlight=False)
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "eval", help="score a model with lm-evaluation-harness",
        description="Score a model directory with lm-evaluation-harness: Chimera's held-out "
                    "reading questions (multiple choice) and held-out text (rolling "
                    "perplexity), written as harness tasks under OUT/tasks; standard harness "
                    "tasks may be named too (they download their data).")
    parser.add_argument("model", metavar="MODEL", help="a model directory")
    parser.add_argument("--tasks", type=task_list, default=list(DEFAULT_TASKS),
                        help=f"comma-separated (default {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--run", default=None,
                        help="the run whose validation documents to use (default: the run a "
                             "promoted model names, else the built-in stories)")
    parser.add_argument("--out", default=None, help=f"default MODEL/{EVAL_DIR}")
    parser.add_argument("--limit", type=argtypes.positive_int, default=None,
                        help="at most this many items per task")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=8)
    parser.add_argument("--questions", type=argtypes.positive_int, default=QUESTIONS,
                        help="held-out questions to draw (for chimera_qa, chimera_preference)")
    parser.add_argument("--texts", type=argtypes.positive_int, default=TEXTS,
                        help="held-out texts for chimera_heldout_ppl")
    parser.add_argument("--seed", type=argtypes.seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.set_defaults(handler=cmd_eval)
