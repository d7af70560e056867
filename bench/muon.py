"""Muon against AdamW for the models a CPU search trains, side by side in one run.

1. Step cost: training tokens/s of one genome with AdamW, ``torch.optim.Muon`` (its Newton-Schulz
   iteration in bf16) and Chimera's ``trainers.muon`` (fp32 on CPU, matrices of one shape
   batched), timings interleaved so that the ratios hold on a noisy machine.
2. Quality, paired: each genome and seed trained for the same wall clock with each optimizer
   (the end-to-end bench's loop: ``train_for_seconds``, its plateau decay, its best state kept),
   scored on the end-to-end bench's held-out documents in bits per byte. The spread between
   seeds of one optimizer is the noise the difference must clear.

    python bench/muon.py --corpus ../shared/data/tinyshakespeare.txt --seconds 300 --seeds 0 1
    python bench/muon.py --corpus FILE --quick          # a smoke run, ~1 min
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
from trainers.recipe import Optimizers, TrainHparams, hidden_matrices, make_optimizer  # noqa: E402
from trainers.steps import train_step  # noqa: E402

CPU = torch.device("cpu")
# The 30-minute bench's winners were of this kind: two RG-LRU blocks at width 64, 0.24M
# parameters; ``tiny`` is the preset a user would try without a search.
GENOMES = {
    "d64-L2-RR": ChimeraConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2,
                               recurrence_ratio=4, window_size=64, tie_embeddings=False,
                               rope_theta=100_000.0),
    "tiny": get_preset("tiny"),
}


def torch_muon_optimizer(model: torch.nn.Module, hparams: TrainHparams) -> Optimizers:
    """``torch.optim.Muon`` on the same matrices, AdamW on the rest: the library's step cost."""
    muon = hidden_matrices(model)
    taken = {id(p) for p in muon}
    adamw = torch.optim.AdamW([p for p in model.parameters() if id(p) not in taken],
                              lr=hparams.learning_rate)
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


def paired_quality(work: Path, genomes: list[str], seeds: list[int], seconds: float,
                   console: Console) -> list[dict]:
    store = prepare_baseline_store(work)
    documents = held_out_documents(work)
    rows = []
    for genome in genomes:
        config = replace(GENOMES[genome], vocab_size=store.vocab_size)
        for seed in seeds:
            for optimizer in ("adamw", "muon"):
                torch.manual_seed(seed)
                model, hparams = Chimera(config), TrainHparams(optimizer=optimizer)
                run = train_for_seconds(model, hparams, store, time.time() + seconds,
                                        seed=seed, plateau_patience=2)
                scored = score_model(model, store.load_tokenizer(), documents, hparams.seq_len)
                row = {"genome": genome, "seed": seed, "optimizer": optimizer,
                       "bpb": scored["bpb"], "tokens_per_second": run.tokens_per_second,
                       "tokens": run.tokens, "best_step": run.best_step, "steps": run.steps}
                console.print(json.dumps(row))
                rows.append(row)
    return rows


def quality_table(rows: list[dict]) -> Table:
    table = Table(title="held-out bits per byte, same genome, seed and wall clock")
    for column in ("genome", "seed", "adamw", "muon", "muon / adamw", "tokens/s adamw, muon"):
        table.add_column(column)
    pairs = {}
    for row in rows:
        pairs.setdefault((row["genome"], row["seed"]), {})[row["optimizer"]] = row
    for (genome, seed), pair in pairs.items():
        a, m = pair["adamw"], pair["muon"]
        table.add_row(genome, str(seed), f"{a['bpb']:.4f}", f"{m['bpb']:.4f}",
                      f"{m['bpb'] / a['bpb']:.3f}",
                      f"{a['tokens_per_second']:,.0f}, {m['tokens_per_second']:,.0f}")
    for genome in dict.fromkeys(g for g, _ in pairs):
        for optimizer in ("adamw", "muon"):
            values = [p[optimizer]["bpb"] for (g, _), p in pairs.items() if g == genome]
            if len(values) > 1:
                table.caption = (table.caption or "") + (
                    f"{genome} {optimizer}: seed spread {max(values) - min(values):.4f} "
                    f"(mean {statistics.mean(values):.4f}); ")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--work", type=Path, default=Path("bench-muon"),
                        help="the end-to-end bench's WORK (its split is reused)")
    parser.add_argument("--seconds", type=float, default=300.0, help="per training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--genomes", nargs="+", default=list(GENOMES), choices=list(GENOMES))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    console = Console()
    seconds = 10.0 if args.quick else args.seconds
    prepare_bench(end_to_end.parse_args(["--corpus", args.corpus, "--budget", "30m"]), args.work)
    rates = Table(title="training tokens/s, steps interleaved (batch 16 x 128, CPU fp32)")
    for column in ("genome", "adamw", "torch.optim.Muon", "trainers.muon", "trainers / torch"):
        rates.add_column(column)
    for genome in args.genomes:
        measured = step_rates(replace(GENOMES[genome], vocab_size=1024), TrainHparams(),
                              5.0 if args.quick else 30.0)
        rates.add_row(genome, *(f"{rate:,.0f}" for rate in measured.values()),
                      f"{measured['trainers.muon'] / measured['torch.optim.Muon']:.2f}")
    console.print(rates)
    rows = paired_quality(args.work, args.genomes, args.seeds[:1] if args.quick else args.seeds,
                          seconds, console)
    console.print(quality_table(rows))


if __name__ == "__main__":
    main()
