"""The promote step on the built-in story corpus, end to end, and what each stage buys.

1. ``chimera evolve`` on the defaults for a short budget (the run to promote).
2. ``chimera promote`` of its best genome with the default settings, timed: Optuna refinement
   on 2 Ray workers, pretraining, chat fine-tuning, evaluation.
3. Side by side in the same run: the same genome pretrained for the same number of tokens with
   the search's default hyperparameters instead of the refined ones, scored on the same
   validation windows.

Printed: validation bpb refined vs defaults (ratio), held-out question answering of the base
model vs the chat model, and the promote's wall time against the 30-minute target.

    python bench/promote.py                 # ~30 minutes on 2 CPU cores
    python bench/promote.py --quick         # a smoke run of the script (~3 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

from rich.console import Console  # noqa: E402

from cluster.app.promote import PromoteSettings, promote  # noqa: E402
from cluster.app.rundir import STORE_DIR  # noqa: E402
from cluster.ray.trials import tuned  # noqa: E402
from search.refine import RefineSettings  # noqa: E402
from trainers.fit import FitSettings  # noqa: E402
from trainers.pretrain import PretrainPlan, pretrain, steps_for_tokens  # noqa: E402
from trainers.recipe import TrainHparams  # noqa: E402
from trainers.store import TokenStore  # noqa: E402

TARGET_MINUTES = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check it runs")
    parser.add_argument("--work", default=None, help="directory for the run (default: temp)")
    args = parser.parse_args()
    console = Console()
    work = Path(args.work or tempfile.mkdtemp(prefix="chimera-bench-promote-"))
    run_dir = work / "run"

    evolve_budget = "40s" if args.quick else "2m"
    console.rule(f"evolve ({evolve_budget})")
    subprocess.run([sys.executable, "-m", "cluster.cli", "evolve", "--budget", evolve_budget,
                    "--run-dir", str(run_dir), "--no-live"], cwd=REPO, check=True)

    settings = PromoteSettings(run_dir=str(run_dir))
    if args.quick:
        settings = dataclasses.replace(
            settings, refine=RefineSettings(trials=3, rungs=2, parallel=2),
            pretrain_tokens=100_000, sft_steps=20,
            sft_conversations=300, qa_questions=20)
    start = time.perf_counter()
    metrics = promote(settings, console)
    promote_minutes = (time.perf_counter() - start) / 60

    console.rule("the same pretraining with the search's default hyperparameters")
    store = TokenStore.open(run_dir / STORE_DIR)
    run = json.loads((run_dir / "run.json").read_text())
    config = _genome_config(metrics, store.vocab_size, settings.max_seq_len)
    # Scored on the same validation windows as the refined run (see cluster.ray.trials.tuned).
    config, defaults = tuned(config, TrainHparams.from_dict(run["hparams"]), {})
    steps = steps_for_tokens(settings.pretrain_tokens, defaults)
    plan = PretrainPlan(config, defaults, FitSettings(steps=steps), settings.seed)
    _, result = pretrain(plan, store)
    default_bpb = store.bits_per_byte(result.val_loss, "val")
    refined_bpb = metrics["pretrain"]["val_bpb"]
    qa = metrics["qa_accuracy"]

    console.rule("results")
    lines = [
        f"genome #{metrics['candidate_id']} {metrics['genome_summary']} "
        f"({metrics['params'] / 1e6:.2f}M params), pretraining {metrics['pretrain']['tokens']:,}"
        f" tokens each",
        f"validation bpb, refined hyperparameters : {refined_bpb:.4f}",
        f"validation bpb, default hyperparameters : {default_bpb:.4f}",
        f"  refined / default                     : {refined_bpb / default_bpb:.3f}x "
        f"({'better' if refined_bpb < default_bpb else 'NOT better'})",
        f"held-out QA accuracy, base model        : {qa['base']:.1%} ({qa['questions']} q)",
        f"held-out QA accuracy, chat model        : {qa['chat']:.1%}",
        f"promote wall time                       : {promote_minutes:.1f} min (target <= "
        f"{TARGET_MINUTES}): {'met' if promote_minutes <= TARGET_MINUTES else 'MISSED'}",
        "stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in metrics["seconds"].items()),
        f"refined: {json.dumps(metrics['refine']['best_params'])}",
        f"model directory: {settings.out_dir}",
    ]
    for line in lines:
        console.print(line, highlight=False)


def _genome_config(metrics: dict, vocab_size: int, max_seq_len: int):
    from search.genome import Genome

    return Genome.from_dict(metrics["genome"]).to_config(vocab_size, max_seq_len)


if __name__ == "__main__":
    main()
