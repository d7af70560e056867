"""Load on ``chimera serve``'s OpenAI-compatible API, on this machine, loopback only: requests
per second, latency and generated tokens per second of ``POST /v1/chat/completions`` with 1, 4
and 8 clients at once, each sending its requests one after another.

The model is the ``tiny`` preset's shape with random weights and a byte-level BPE tokenizer
(or ``--model DIR``, a model directory): what is measured is the server and the model's decoding,
not what it says. Every reply is asked for exactly ``--max-tokens`` tokens (an end-of-turn token
ends one early: the usage counts say how many were made). Bounded: ``--requests`` per client.

    python bench/serve_load.py                       # ~1-2 minutes on 2 CPU cores
    python bench/serve_load.py --model RUN/promoted --requests 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # import the packages, not a sibling script named like one

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from chimera.checkpoint import save_model  # noqa: E402
from chimera.config import get_preset  # noqa: E402
from chimera.inference import TOKENIZER_DIR, load_pretrained  # noqa: E402
from chimera.model import Chimera  # noqa: E402
from chimera.tokenizer import train_bpe  # noqa: E402
from cluster.serve import ChatService, Limits, make_server  # noqa: E402
from trainers.corpus import CorpusSpec, iter_documents  # noqa: E402

CLIENTS = (1, 4, 8)
PROMPT = [{"role": "user", "content": "Tell me a story about Lily at the park."}]


def random_model(directory: Path) -> Path:
    """The tiny preset with random weights and a 1,024-token BPE of the built-in stories."""
    tokenizer = train_bpe(iter_documents(CorpusSpec("stories", stories_bytes=200_000)), 1024)
    torch.manual_seed(0)
    save_model(Chimera(replace(get_preset("tiny"), vocab_size=len(tokenizer))), directory)
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return directory


def one_request(port: int, max_tokens: int, seed: int) -> tuple[float, int, int]:
    """(seconds, HTTP status, completion tokens) of one non-streaming completion."""
    body = json.dumps({"messages": PROMPT, "max_tokens": max_tokens, "temperature": 1.0,
                       "seed": seed})
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
    finally:
        connection.close()
    tokens = data["usage"]["completion_tokens"] if response.status == 200 else 0
    return time.perf_counter() - began, response.status, tokens


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` completions one after another."""
    results: list[tuple[float, int, int]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            outcome = one_request(port, max_tokens, seed=index * 1000 + k)
            with lock:
                results.append(outcome)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    served = sorted(seconds for seconds, status, _ in results if status == 200)
    tokens = sum(t for *_, t in results)
    return {"clients": clients, "requests": len(results), "ok": len(served), "wall": wall,
            "per_second": len(served) / wall, "median": statistics.median(served),
            "p95": served[min(len(served) - 1, int(0.95 * len(served)))],
            "tokens_per_second": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: random tiny)")
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="chimera-serve-load-") as scratch:
        directory = args.model or random_model(Path(scratch) / "model")
        model, tokenizer = load_pretrained(directory)
        service = ChatService(model, tokenizer, directory.name,
                              Limits(max_concurrent=max(CLIENTS)))
        with make_server(service, "127.0.0.1", 0) as server:
            port = server.server_address[1]
            one_request(port, args.max_tokens, seed=0)  # warm up: first-call allocations
            rows = [load(port, clients, args.requests, args.max_tokens) for clients in CLIENTS]
    table = Table(title=f"POST /v1/chat/completions, {args.max_tokens} new tokens per reply, "
                        f"{torch.get_num_threads()} torch threads, "
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    for column in ("clients", "requests (ok)", "requests/s", "latency median", "latency p95",
                   "generated tokens/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["clients"]), f"{row['requests']} ({row['ok']})",
                      f"{row['per_second']:.2f}", f"{row['median']:.2f} s",
                      f"{row['p95']:.2f} s", f"{row['tokens_per_second']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
