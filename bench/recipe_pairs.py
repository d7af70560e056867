"""Changes to Chimera's training recipe, paired against it, for the models a CPU search trains.

1. Quality: each genome and seed trained for the same wall clock with the recipe as it is and
   with each ``--variants`` change (``muon``: the Muon optimizer; ``dropout=X``: the genome's
   dropout set to X), in the end-to-end bench's loop (``train_for_seconds``, the plateau decay,
   the best state kept), scored on the end-to-end bench's held-out documents in bits per byte.
   Pairs share genome, seed and initial weights; the spread between seeds is the noise a
   difference must clear.
2. ``--step-rates``: Muon's step cost, training tokens/s of each genome with AdamW,
   ``torch.optim.Muon`` (its Newton-Schulz iteration in bf16) and ``trainers.muon`` (fp32 on CPU,
   same-shaped matrices batched), timings interleaved so that the ratios hold on a noisy machine.

    python bench/recipe_pairs.py --corpus ../shared/data/tinyshakespeare.txt --work W \\
        --seconds 240 --seeds 0 1 --variants muon --step-rates
    python bench/recipe_pairs.py --corpus ../shared/data/tinyshakespeare.txt --work W \\
        --seconds 360 --seeds 0 --genomes winner-1.7M d64-L2-RR --variants dropout=0.1 dropout=0.2
    python bench/recipe_pairs.py --corpus FILE --quick --variants muon   # a smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.end_to_end as end_to_end  # noqa: E402
from bench.end_to_end import (  # noqa: E402
    held_out_documents,
    prepare_baseline_store,
    prepare_bench,
    score_model,
)
from bench.nanogpt import train_for_seconds  # noqa: E402
from chimera.config import ChimeraConfig, get_preset  # noqa: E402
from chimera.model import Chimera  # noqa: E402
from trainers.recipe import Optimizers, TrainHparams, make_optimizer, muon_split  # noqa: E402
from trainers.steps import train_step  # noqa: E402

CPU = torch.device("cpu")
BASELINE = "recipe"
# Winners of the 30-minute bench's searches (2026-12-03): seeds 0 and 1 picked two RG-LRU
# blocks at width 64 (0.24M), seed 2 this 1.69M model; ``tiny`` is the preset a user would try.
GENOMES = {
    "d64-L2-RR": ChimeraConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2,
                               recurrence_ratio=4, window_size=64, tie_embeddings=False,
                               rope_theta=100_000.0),
    "winner-1.7M": ChimeraConfig(d_model=128, n_layers=6, n_heads=2, n_kv_heads=2,
                                 ffn_multiplier=3.5, recurrence_ratio=4, window_size=128,
                                 qk_norm=True, parallel_block=True, tie_embeddings=False,
                                 rope_theta=100_000.0),
    "tiny": get_preset("tiny"),
}


def variant(name: str, config: ChimeraConfig, hparams: TrainHparams
            ) -> tuple[ChimeraConfig, TrainHparams]:
    """The genome and recipe of ``name``: ``recipe`` (unchanged), ``muon`` or ``dropout=X``."""
    if name == BASELINE:
        return config, hparams
    if name == "muon":
        return config, replace(hparams, optimizer="muon")
    if name.startswith("dropout="):
        return replace(config, dropout=float(name.split("=", 1)[1])), hparams
    raise ValueError(f"{name!r} is not muon or dropout=X")


def torch_muon_optimizer(model: torch.nn.Module, hparams: TrainHparams) -> Optimizers:
    """``torch.optim.Muon`` on the same matrices, AdamW on the rest: the library's step cost."""
    muon, rest = muon_split(model)
    adamw = torch.optim.AdamW(rest, lr=hparams.learning_rate)
    return Optimizers([torch.optim.Muon(muon, lr=hparams.learning_rate,
                                        adjust_lr_fn="match_rms_adamw"), adamw])


def step_rates(config: ChimeraConfig, hparams: TrainHparams, seconds: float) -> dict[str, float]:
    """Training tokens/s per optimizer, their steps interleaved in rounds."""
    makers = {"adamw": lambda m: make_optimizer(m, replace(hparams, optimizer="adamw")),
              "torch.optim.Muon": lambda m: torch_muon_optimizer(m, hparams),
              "trainers.muon": lambda m: make_optimizer(m, replace(hparams, optimizer="muon"))}
    runs = {}
    for name, make in makers.items():
        model = Chimera(config)
        runs[name] = (model, make(model))
    tokens = torch.randint(0, config.vocab_size, (hparams.batch_size, hparams.seq_len + 1))
    spent = dict.fromkeys(runs, 0.0)
    steps = dict.fromkeys(runs, 0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, (model, optimizer) in runs.items():
            began = time.perf_counter()
            for _ in range(5):
                train_step(model, optimizer, (tokens, None), hparams, progress=0.5, step=0,
                           device=CPU)
            spent[name] += time.perf_counter() - began
            steps[name] += 5
    step_tokens = hparams.batch_size * hparams.seq_len
    return {name: steps[name] * step_tokens / spent[name] for name in runs}


def rates_table(genomes: list[str], seconds: float) -> Table:
    table = Table(title="training tokens/s, steps interleaved (batch 16 x 128, CPU fp32)")
    for column in ("genome", "adamw", "torch.optim.Muon", "trainers.muon", "trainers / torch"):
        table.add_column(column)
    for genome in genomes:
        measured = step_rates(replace(GENOMES[genome], vocab_size=1024), TrainHparams(), seconds)
        table.add_row(genome, *(f"{rate:,.0f}" for rate in measured.values()),
                      f"{measured['trainers.muon'] / measured['torch.optim.Muon']:.2f}")
    return table


def paired_quality(work: Path, genomes: list[str], seeds: list[int], variants: list[str],
                   seconds: float, console: Console) -> list[dict]:
    store = prepare_baseline_store(work)
    documents = held_out_documents(work)
    rows = []
    for genome in genomes:
        for seed in seeds:
            for name in [BASELINE, *variants]:
                config, hparams = variant(name, replace(GENOMES[genome],
                                                        vocab_size=store.vocab_size),
                                          TrainHparams())
                torch.manual_seed(seed)
                model = Chimera(config)
                run = train_for_seconds(model, hparams, store, time.time() + seconds,
                                        seed=seed, plateau_patience=2)
                scored = score_model(model, store.load_tokenizer(), documents, hparams.seq_len)
                row = {"genome": genome, "seed": seed, "variant": name, "bpb": scored["bpb"],
                       "tokens_per_second": run.tokens_per_second, "tokens": run.tokens,
                       "best_step": run.best_step, "steps": run.steps}
                console.print(json.dumps(row))
                rows.append(row)
    return rows


def quality_table(rows: list[dict], variants: list[str]) -> Table:
    table = Table(title="held-out bits per byte, same genome, seed and wall clock")
    for column in ("genome", "seed", BASELINE, *(f"{v} (x)" for v in variants), "tokens/s"):
        table.add_column(column)
    runs = {}
    for row in rows:
        runs.setdefault((row["genome"], row["seed"]), {})[row["variant"]] = row
    for (genome, seed), pair in runs.items():
        base = pair[BASELINE]["bpb"]
        table.add_row(genome, str(seed), f"{base:.4f}",
                      *(f"{pair[v]['bpb']:.4f} ({pair[v]['bpb'] / base:.3f})" for v in variants),
                      ", ".join(f"{pair[v]['tokens_per_second']:,.0f}"
                                for v in [BASELINE, *variants]))
    notes = []
    for genome in dict.fromkeys(g for g, _ in runs):
        for name in [BASELINE, *variants]:
            values = [p[name]["bpb"] for (g, _), p in runs.items() if g == genome]
            if len(values) > 1:
                notes.append(f"{genome} {name}: seed spread {max(values) - min(values):.4f} "
                             f"(mean {statistics.mean(values):.4f})")
    table.caption = "; ".join(notes) or None
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--work", type=Path, default=Path("bench-recipe-pairs"),
                        help="the end-to-end bench's WORK (its 30-minute split is reused)")
    parser.add_argument("--seconds", type=float, default=300.0, help="per training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--genomes", nargs="+", default=["d64-L2-RR", "tiny"],
                        choices=list(GENOMES))
    parser.add_argument("--variants", nargs="+", default=["muon"],
                        help="muon, dropout=X (each against the recipe as it is)")
    parser.add_argument("--step-rates", action="store_true", help="also Muon's step cost")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for name in args.variants:  # a bad name fails before any training
        try:
            variant(name, GENOMES["tiny"], TrainHparams())
        except ValueError as error:
            parser.error(f"--variants: {error}")
    console = Console()
    prepare_bench(end_to_end.parse_args(["--corpus", args.corpus, "--budget", "30m"]), args.work)
    if args.step_rates:
        console.print(rates_table(args.genomes, 5.0 if args.quick else 30.0))
    rows = paired_quality(args.work, args.genomes, args.seeds[:1] if args.quick else args.seeds,
                          args.variants, 10.0 if args.quick else args.seconds, console)
    console.print(quality_table(rows, args.variants))


if __name__ == "__main__":
    main()
