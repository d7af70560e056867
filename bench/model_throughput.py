"""Chimera (hybrid) against an attention-only twin, side by side in one run, on CPU in fp32.

Prints, as ratios measured in the same process with the two models' timings interleaved (this
machine is shared and noisy, so absolute numbers drift but ratios hold):

1. training tokens/s (forward + backward + AdamW step) at sequence lengths 256 and 2048;
2. the share of a hybrid training step spent in the RG-LRU (forward + backward of the fused
   kernel, or of the eager Function with ``CHIMERA_FUSED_KERNELS=0``), and the linear scan's
   cost against one d_model x d_model linear layer (forward + backward) over the same tokens;
3. decoding tokens/s after a 2048-token prompt (the attention-only model keeps a full KV cache)
   at batch 1 (latency-bound) and batch 16 (throughput).

The attention-only twin has the same width, depth, heads, KV heads and MLP, with every layer full
causal attention (recurrence_ratio=0, window = context length).

    python bench/model_throughput.py                 # the figures in BENCHMARKS.md
    python bench/model_throughput.py --quick         # a fast smoke run
    CHIMERA_FUSED_KERNELS=0 python bench/model_throughput.py   # the eager PyTorch path
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from chimera.config import ChimeraConfig, get_preset
from chimera.kernels import DISABLE_VARIABLE, fused_ops
from chimera.model import Chimera
from chimera.scan import linear_scan


def with_context(config: ChimeraConfig, context: int) -> ChimeraConfig:
    return dataclasses.replace(config, max_seq_len=max(context, config.max_seq_len))


def attention_only_twin(config: ChimeraConfig, context: int) -> ChimeraConfig:
    """Same genes, every layer full causal attention over the whole context."""
    return dataclasses.replace(with_context(config, context), recurrence_ratio=0,
                               window_size=max(context, config.max_seq_len))


def make_train_step(model: Chimera, batch: int, length: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length + 1))

    def step() -> None:
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def interleaved_seconds(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
                        ) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn so drift hits all equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_training(hybrid_cfg: ChimeraConfig, length: int, tokens_per_step: int, repeats: int):
    batch = max(1, tokens_per_step // length)
    models = {"hybrid": Chimera(with_context(hybrid_cfg, length)),
              "attention": Chimera(attention_only_twin(hybrid_cfg, length))}
    steps = {name: make_train_step(m, batch, length) for name, m in models.items()}
    seconds = interleaved_seconds(steps, repeats)
    return {name: batch * length / s for name, s in seconds.items()}, batch


def scan_share_of_step(hybrid_cfg: ChimeraConfig, length: int, tokens_per_step: int) -> float:
    batch = max(1, tokens_per_step // length)
    model = Chimera(with_context(hybrid_cfg, length))
    step = make_train_step(model, batch, length)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("train_step"):
                step()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    return (totals["rglru_forward"] + totals["rglru_backward"]) / totals["train_step"]


def scan_vs_linear(d_model: int, length: int, tokens_per_step: int, repeats: int) -> float:
    batch = max(1, tokens_per_step // length)
    a = torch.rand(batch, length, d_model).mul_(0.1).add_(0.9).requires_grad_()
    b = torch.randn(batch, length, d_model, requires_grad=True)
    grad = torch.randn(batch, length, d_model)
    linear = torch.nn.Linear(d_model, d_model, bias=False)
    x = torch.randn(batch, length, d_model, requires_grad=True)

    def scan_fwd_bwd():
        linear_scan(a, b).backward(grad)

    def linear_fwd_bwd():
        linear(x).backward(grad)

    seconds = interleaved_seconds({"scan": scan_fwd_bwd, "linear": linear_fwd_bwd}, repeats)
    return seconds["scan"] / seconds["linear"]


@torch.inference_mode()
def bench_decoding(hybrid_cfg: ChimeraConfig, context: int, new_tokens: int, batch: int,
                   repeats: int):
    models = {"hybrid": Chimera(with_context(hybrid_cfg, context + new_tokens)).eval(),
              "attention": Chimera(attention_only_twin(hybrid_cfg, context + new_tokens)).eval()}
    prompt = torch.randint(0, hybrid_cfg.vocab_size, (batch, context))
    next_tokens = torch.randint(0, hybrid_cfg.vocab_size, (batch, 1))
    prefilled = {name: m(prompt, m.init_cache(batch))[1] for name, m in models.items()}

    def decoder(name):
        model, cache0 = models[name], prefilled[name]

        def run():
            # Copy the prefilled cache so every repeat decodes from the same 2048-token context.
            cache = cache0._replace(layers=tuple(type(c)(*(t.clone() for t in c))
                                                 for c in cache0.layers))
            for _ in range(new_tokens):
                _, cache = model(next_tokens, cache)
        return run

    seconds = interleaved_seconds({name: decoder(name) for name in models}, repeats)
    return {name: batch * new_tokens / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini", help="hybrid model to measure")
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tokens_per_step, args.repeats, args.decode_tokens = 2048, 2, 8
        args.decode_batches = [1]

    config = get_preset(args.preset)
    console = Console()
    kernels = "on" if fused_ops() is not None else f"off ({DISABLE_VARIABLE} or no compiler)"
    console.print(f"[bold]Chimera '{args.preset}' ({config.summary()}, pattern "
                  f"{config.pattern}) vs attention-only twin[/bold]; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, fp32 CPU, "
                  f"{args.tokens_per_step} tokens/step; fused CPU kernels {kernels}")

    table = Table(title="training tokens/s (forward + backward + AdamW)")
    for col in ("seq len", "batch", "hybrid tok/s", "attention-only tok/s", "hybrid / attention",
                "target"):
        table.add_column(col)
    for length, target in ((256, 1.0), (2048, 1.5)):
        rates, batch = bench_training(config, length, args.tokens_per_step, args.repeats)
        ratio = rates["hybrid"] / rates["attention"]
        table.add_row(str(length), str(batch), f"{rates['hybrid']:.0f}",
                      f"{rates['attention']:.0f}", f"{ratio:.2f}x",
                      f">= {target}x {'ok' if ratio >= target else 'MISSED'}")
    console.print(table)

    table = Table(title="RG-LRU cost")
    for col in ("seq len", "RG-LRU share of hybrid train step",
                f"scan / linear({config.d_model}x{config.d_model})", "target"):
        table.add_column(col)
    for length in (256, 2048):
        share = scan_share_of_step(config, length, args.tokens_per_step)
        ratio = scan_vs_linear(config.lru_dim, length, args.tokens_per_step, args.repeats)
        table.add_row(str(length), f"{share:.1%}", f"{ratio:.2f}x",
                      f"<= 1.0x {'ok' if ratio <= 1.0 else 'MISSED'}")
    console.print(table)

    context = 2048
    table = Table(title=f"decoding tokens/s after a {context}-token prompt "
                        f"({args.decode_tokens} new tokens)")
    for col in ("batch", "hybrid tok/s", "attention-only tok/s", "hybrid / attention", "target"):
        table.add_column(col)
    for batch in args.decode_batches:
        rates = bench_decoding(config, context, args.decode_tokens, batch, args.repeats)
        ratio = rates["hybrid"] / rates["attention"]
        table.add_row(str(batch), f"{rates['hybrid']:.1f}", f"{rates['attention']:.1f}",
                      f"{ratio:.2f}x", f">= 1.5x {'ok' if ratio >= 1.5 else 'MISSED'}")
    console.print(table)


if __name__ == "__main__":
    main()
