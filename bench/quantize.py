"""Dynamic int8 (``--quantize 8``) against float32 for CPU generation, side by side.

Loads a model directory twice (float32, int8), then alternates timed runs of the same greedy
generation (prompt prefill + decode, batch 1) so both see the same machine noise. Prints decode
tokens per second, the int8/float32 ratio, and how often the two greedy continuations agree.

    python bench/quantize.py MODEL_DIR [--tokens 128] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

import torch  # noqa: E402

from chimera.generation import SamplingConfig, generate  # noqa: E402
from chimera.inference import load_pretrained  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily who lived near the park."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"float32": load_pretrained(args.model)[0], "int8": load_pretrained(args.model, 8)[0]}
    _, tokenizer = load_pretrained(args.model)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=0.0)
    outputs = {name: generate(model, prompt, sampling) for name, model in models.items()}
    speed: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            produced = generate(model, prompt, sampling)
            speed[name].append(len(produced) / (time.perf_counter() - start))
    fp, q = statistics.median(speed["float32"]), statistics.median(speed["int8"])
    same = sum(a == b for a, b in zip(outputs["float32"], outputs["int8"]))
    print(f"{args.model}: {len(prompt)}-token prompt, {args.tokens} new tokens, batch 1, "
          f"{args.threads} thread(s), median of {args.rounds}")
    print(f"float32 {fp:,.0f} tok/s   int8 {q:,.0f} tok/s   int8/float32 {q / fp:.2f}x")
    print(f"greedy continuations agree on {same}/{len(outputs['float32'])} tokens")


if __name__ == "__main__":
    main()
