"""Changes to Chimera's training recipe, paired against it, for the models a CPU search trains.

1. Quality: each genome and seed trained for the same wall clock with the recipe as it is and
   with each ``--variants`` change (``muon``: the Muon optimizer; ``dropout=X``: the genome's
   dropout set to X; ``documents``: the recurrence reset and attention kept inside each packed
   document, chimera.documents), in the end-to-end bench's loop (``train_for_seconds``, the
   plateau decay, the best state kept), scored on the end-to-end bench's held-out documents in
   bits per byte. Pairs share genome, seed and initial weights; the spread between seeds is the
   noise a difference must clear. ``--steps N`` trains each run for N steps instead, in
   pretraining's own loop (``trainers.pretrain``: evaluations every N/10 steps, the best kept,
   the plateau decay): pairs then see the same batches in the same order, and the machine's
   noise reaches only their tokens/s, not how far they train.
2. ``--variant-rates``: each variant's training tokens/s against the recipe's on the store's
   own batches (where its documents end), timings interleaved as below.
3. ``--step-rates``: Muon's step cost, training tokens/s of each genome with AdamW,
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
from trainers.fit import FitSettings  # noqa: E402
from trainers.pretrain import PretrainPlan, pretrain  # noqa: E402
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


def variant(name: str, config: ChimeraConfig, hparams: TrainHparams, document_token: int = 0
            ) -> tuple[ChimeraConfig, TrainHparams]:
    """The genome and recipe of ``name``: ``recipe`` (unchanged), ``muon``, ``documents`` (the
    store's end-of-text token starts a document) or ``dropout=X``."""
    if name == BASELINE:
        return config, hparams
    if name == "muon":
        return config, replace(hparams, optimizer="muon")
    if name == "documents":
        return replace(config, document_token=document_token), hparams
    if name.startswith("dropout="):
        return replace(config, dropout=float(name.split("=", 1)[1])), hparams
    raise ValueError(f"{name!r} is not muon, documents or dropout=X")


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


def variant_rates_table(store, genomes: list[str], variants: list[str], seconds: float) -> Table:
    """Training tokens/s of each variant on the same store batches, steps interleaved."""
    names = [BASELINE, *variants]
    table = Table(title=f"training tokens/s on the store's batches, steps interleaved "
                        f"({seconds:g}s per genome)")
    for column in ("genome", *names, *(f"{v} / {BASELINE}" for v in variants)):
        table.add_column(column)
    for genome in genomes:
        runs = {}
        for name in names:
            config, hparams = variant(name, replace(GENOMES[genome], vocab_size=store.vocab_size),
                                      TrainHparams(), store.meta["end_of_text_id"])
            torch.manual_seed(0)
            model = Chimera(config)
            runs[name] = (model, make_optimizer(model, hparams), hparams)
        batches = [store.sample("train", TrainHparams().batch_size, TrainHparams().seq_len, 0,
                                step) for step in range(5)]
        spent, steps = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for name, (model, optimizer, hparams) in runs.items():
                began = time.perf_counter()
                for step, tokens in enumerate(batches):
                    train_step(model, optimizer, (tokens, None), hparams, progress=0.5,
                               step=step, device=CPU)
                spent[name] += time.perf_counter() - began
                steps[name] += len(batches)
        step_tokens = TrainHparams().batch_size * TrainHparams().seq_len
        rates = {name: steps[name] * step_tokens / spent[name] for name in names}
        table.add_row(genome, *(f"{rates[n]:,.0f}" for n in names),
                      *(f"{rates[v] / rates[BASELINE]:.3f}" for v in variants))
    return table


def rates_table(genomes: list[str], seconds: float) -> Table:
    table = Table(title="training tokens/s, steps interleaved (batch 16 x 128, CPU fp32)")
    for column in ("genome", "adamw", "torch.optim.Muon", "trainers.muon", "trainers / torch"):
        table.add_column(column)
    for genome in genomes:
        measured = step_rates(replace(GENOMES[genome], vocab_size=1024), TrainHparams(), seconds)
        table.add_row(genome, *(f"{rate:,.0f}" for rate in measured.values()),
                      f"{measured['trainers.muon'] / measured['torch.optim.Muon']:.2f}")
    return table


def train_for_steps(config: ChimeraConfig, hparams: TrainHparams, store, steps: int,
                    seed: int) -> tuple[Chimera, dict]:
    """``steps`` steps of pretraining's loop from the seed's weights and batches."""
    fit = FitSettings(steps=steps, eval_every=max(1, steps // 10), keep_best=True,
                      plateau_patience=2)
    began = time.perf_counter()
    model, result = pretrain(PretrainPlan(config, hparams, fit, seed), store)
    seconds = time.perf_counter() - began
    tokens = result.step * hparams.batch_size * hparams.seq_len
    return model, {"tokens_per_second": tokens / seconds, "tokens": tokens,
                   "best_step": result.history.best_step, "steps": result.step}


def paired_quality(work: Path, genomes: list[str], seeds: list[int], variants: list[str],
                   seconds: float, console: Console, steps: int | None = None) -> list[dict]:
    store = prepare_baseline_store(work)
    documents = held_out_documents(work)
    rows = []
    for genome in genomes:
        for seed in seeds:
            for name in [BASELINE, *variants]:
                config, hparams = variant(name, replace(GENOMES[genome],
                                                        vocab_size=store.vocab_size),
                                          TrainHparams(), store.meta["end_of_text_id"])
                if steps:
                    model, run = train_for_steps(config, hparams, store, steps, seed)
                else:
                    torch.manual_seed(seed)
                    model = Chimera(config)
                    timed = train_for_seconds(model, hparams, store, time.time() + seconds,
                                              seed=seed, plateau_patience=2)
                    run = {"tokens_per_second": timed.tokens_per_second, "tokens": timed.tokens,
                           "best_step": timed.best_step, "steps": timed.steps}
                scored = score_model(model, store.load_tokenizer(), documents, hparams.seq_len)
                row = {"genome": genome, "seed": seed, "variant": name, "bpb": scored["bpb"],
                       **run}
                console.print(json.dumps(row))
                rows.append(row)
    return rows


def quality_table(rows: list[dict], variants: list[str]) -> Table:
    table = Table(title="held-out bits per byte, same genome, seed and budget")
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
    parser.add_argument("--steps", type=int, help="instead of --seconds: this many steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--genomes", nargs="+", default=["d64-L2-RR", "tiny"],
                        choices=list(GENOMES))
    parser.add_argument("--variants", nargs="+", default=["muon"],
                        help="muon, documents, dropout=X (each against the recipe as it is)")
    parser.add_argument("--step-rates", action="store_true", help="also Muon's step cost")
    parser.add_argument("--variant-rates", action="store_true",
                        help="also each variant's training tokens/s against the recipe's")
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
    if args.variant_rates:
        console.print(variant_rates_table(prepare_baseline_store(args.work), args.genomes,
                                          args.variants, 5.0 if args.quick else 60.0))
    rows = paired_quality(args.work, args.genomes, args.seeds[:1] if args.quick else args.seeds,
                          args.variants, 10.0 if args.quick else args.seconds, console,
                          steps=args.steps and (20 if args.quick else args.steps))
    console.print(quality_table(rows, args.variants))


if __name__ == "__main__":
    main()
