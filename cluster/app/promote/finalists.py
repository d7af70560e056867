"""Finalists: the search's winner ranked again at the pretraining horizon, against larger ones.

The search ranks genomes after seconds of training, where a small model learns fastest; the user
keeps what pretraining makes of one after many epochs, where a larger model with dropout wins
(on the 30-minute tinyshakespeare bench, BENCHMARKS.md: search winners of 0.19-0.72M parameters
pretrained to 1.879-1.884 held-out bpb, a 1.69M one to 1.870). So under ``--budget``, promote
pretrains a size ladder of finalists, each a complete pretraining with its share of the
budget (its own schedule and dropout rule): the leaderboard's best, then the best-ranked genome
with at least ``FINALIST_GROWTH`` times its parameters, and so on. The one with the lowest
validation loss *is* the base model: the selection measured the model the user keeps, so
nothing is trained again. The others stay in ``OUT/finalists/`` (the report lists them all).

Each finalist's result is kept in the pretrain stage's record as it finishes, so an interrupted
promote resumes with the next one (and the one in progress resumes from its checkpoints).

Off by default (``--finalists 1``): on the 30-minute bench three seeds with up to three
finalists averaged 1.8877 held-out bpb against 1.8810 without (BENCHMARKS.md, "Finalists"). A
third of the seconds each leaves a large finalist under-trained (1.92M parameters: 3.9 epochs,
still improving when its time ended), and the validation split ranked two finalists the
opposite way to the held-out documents once (0.5% apart).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chimera.model import param_counts_analytic
from cluster.app.promote.settings import BASE_DIR, run_settings
from results.db import RunDatabase
from search.genome import Genome
from trainers.fit import FitResult, History

FINALIST_GROWTH = 2.0  # each finalist at least this many times the previous one's parameters
# A finalist trains at least this many steps (fewer finalists when the budget's pretraining
# cannot give each this many): a search candidate trains ~100, and a finalist has to see the
# epochs the base model will, or its ranking says no more than the search's.
MIN_FINALIST_STEPS = 200
FINALISTS_DIR = "finalists"


@dataclass(frozen=True)
class Finalist:
    candidate_id: int
    genome: Genome
    params: int  # at the promote's vocabulary and context

    @property
    def name(self) -> str:
        return f"candidate-{self.candidate_id}"


def size_ladder(run_dir: str, count: int, vocab_size: int, max_seq_len: int) -> list[Finalist]:
    """Up to ``count`` finalists from the run's leaderboard (``ladder``)."""
    db = RunDatabase(run_settings(run_dir).database_target, readonly=True)
    try:
        records = db.leaderboard_records()
    finally:
        db.close()
    return ladder([(r.id, Genome.from_dict(r.genome)) for r in records], count,
                  lambda genome: param_counts_analytic(genome.to_config(vocab_size,
                                                                        max_seq_len)).total)


def ladder(ranked: list[tuple[int, Genome]], count: int,
           params_of: Callable[[Genome], int]) -> list[Finalist]:
    """Up to ``count`` of the ``ranked`` candidates (id, genome; best first): the best, then
    each time the best-ranked one with at least ``FINALIST_GROWTH`` times the parameters of the
    last chosen. Fewer when there are no larger ones."""
    chosen: list[Finalist] = []
    for candidate_id, genome in ranked:
        params = params_of(genome)
        if not chosen or params >= FINALIST_GROWTH * chosen[-1].params:
            chosen.append(Finalist(candidate_id, genome, params))
        if len(chosen) == count:
            break
    return chosen


def affordable(count: int, pretrain_seconds: float, tokens_per_second: float,
               step_tokens: int) -> int:
    """How many of ``count`` finalists pretraining's seconds can give ``MIN_FINALIST_STEPS``
    each (at the winner's speed), at least 1."""
    steps = pretrain_seconds * tokens_per_second / step_tokens
    return max(1, min(count, int(steps // MIN_FINALIST_STEPS)))


def pretrain_finalists(finalists: list[Finalist], progress: dict, out: Path,
                       train: Callable[[Finalist, Path, Path], tuple[FitResult, float]],
                       bits_per_byte: Callable[[float], float], save: Callable[[], None],
                       announce: Callable[[str], None]) -> tuple[Finalist, FitResult]:
    """Pretrain each finalist not yet in ``progress["trained"]`` (the stage record's, by
    name; ``save`` persists it) into ``OUT/finalists/NAME`` with ``train(finalist, model_dir,
    checkpoints) -> (result, dropout)``, then move the one with the lowest validation loss to
    ``OUT/base``. Returns it and its result."""
    home = out / FINALISTS_DIR
    trained = progress.setdefault("trained", {})
    for number, finalist in enumerate(finalists, 1):
        if finalist.name in trained:
            continue
        announce(f"finalist {number}/{len(finalists)}: candidate #{finalist.candidate_id} "
                 f"{finalist.genome.summary()} ({finalist.params / 1e6:.2f}M parameters)")
        result, dropout = train(finalist, home / finalist.name,
                                out / "checkpoints" / "pretrain" / finalist.name)
        trained[finalist.name] = {
            "candidate_id": finalist.candidate_id, "genome": finalist.genome.to_dict(),
            "genome_summary": finalist.genome.summary(), "params": finalist.params,
            "dropout": dropout, "step": result.step, "history": result.history.to_dict(),
            "val_bpb": bits_per_byte(result.val_loss)}
        save()
    best = min(finalists, key=lambda f: trained[f.name]["val_bpb"])
    ranking = ", ".join(f"#{f.candidate_id} {trained[f.name]['val_bpb']:.4f}" for f in finalists)
    announce(f"finalists' validation bpb: {ranking}; candidate #{best.candidate_id} is the "
             f"base model")
    source = home / best.name
    if source.is_dir():  # else moved by an attempt that stopped before recording it
        os.replace(source, out / BASE_DIR)
    chosen = trained[best.name]
    return best, FitResult(chosen["step"], History.from_dict(chosen["history"]))


def summary(progress: dict) -> list[dict]:
    """The finalists trained, for metrics.json: each one's result, its history's seconds in
    place of its history."""
    return [{**{key: value for key, value in entry.items() if key != "history"},
             "seconds": entry["history"]["seconds"]}
            for entry in progress.get("trained", {}).values()]
