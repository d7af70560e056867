"""Load check of ``chimera dashboard``: how long its JSON takes on a large run. Bounded, on
loopback only, in a temporary directory.

A run database of 10,000 synthetic candidates is written with ``RunDatabase``'s own record_*
methods (random genomes of the cpu space, most of them children of earlier ones, each with a
100-point loss curve; a few failed, a few still running), then a dashboard server reads it and
this measures, over one keep-alive connection:

- ``/api/candidates`` cold (the first read of the whole run), warm (nothing changed: the
  snapshot's JSON is reused), and after a write (a candidate finishes: read and built again);
- ``/api/candidates/{id}`` for random ids (warm).

    python bench/dashboard.py [--candidates 10000] [--requests 50]
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere

from cluster.serve.dashboard import make_dashboard_server  # noqa: E402
from cluster.serve.run_view import REFRESH_SECONDS, RunView  # noqa: E402
from results.db import RunDatabase  # noqa: E402
from search.evolution import Proposal  # noqa: E402
from search.genome import get_space  # noqa: E402
from search.loop import proposal_record  # noqa: E402
from trainers.candidate import CandidateResult, Status  # noqa: E402

CONFIG = {"space": "cpu", "strategy": "evolution", "objectives": ["bpb"],
          "candidate_budget": {"kind": "steps", "amount": 1000},
          "limits": {"wall_seconds": None, "max_candidates": None, "max_generations": None,
                     "train_flops": None}}


def propose(db: RunDatabase, rng: random.Random, born: int) -> int:
    """One candidate proposed: a random genome, a child of one or two earlier ones after the
    first 20."""
    parents = () if born < 20 else tuple(rng.sample(range(1, born + 1), rng.choice((1, 2))))
    operator = "random" if not parents else ("mutation" if len(parents) == 1 else "crossover")
    return db.record_proposal(proposal_record(Proposal(get_space("cpu").sample(rng), parents,
                                                       operator, born // 20)))


def finish(db: RunDatabase, rng: random.Random, candidate_id: int) -> None:
    """A result as a worker sends it: ok (or now and then failed), with its loss curve."""
    failed = rng.random() < 0.03
    loss = 4.0 + rng.random()
    result = CandidateResult(
        status=Status.FAILED if failed else Status.OK, error="RuntimeError: boom" if failed
        else None, val_loss=None if failed else 1.5 + rng.random(),
        val_bpb=None if failed else 1.8 + rng.random(), params=rng.randrange(100_000, 5_000_000),
        steps=1000, tokens=1_024_000, tokens_per_second=rng.uniform(2e3, 2e4),
        train_flops=rng.uniform(1e12, 1e13), wall_seconds=rng.uniform(20, 120),
        loss_curve=[(step, loss * 0.999 ** step) for step in range(1, 1001, 10)])
    db.record_result(candidate_id, {**result.to_dict(), "worker": f"node-{candidate_id % 8}"})


def fill(path: Path, candidates: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    db = RunDatabase(path)
    try:
        db.set_config(CONFIG)
        for born in range(candidates):
            candidate_id = propose(db, rng, born)
            if born < candidates - 8:  # the last 8 are still training
                finish(db, rng, candidate_id)
            else:
                db.record_start(candidate_id, f"node-{candidate_id % 8}")
    finally:
        db.close()


def timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (path, response.status, body[:200])
    return time.perf_counter() - started, len(body)


def summary_row(name: str, samples: list[tuple[float, int]]) -> list[str]:
    times = sorted(t * 1000 for t, _ in samples)
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return [name, str(len(times)), f"{statistics.median(times):.1f}", f"{p95:.1f}",
            f"{times[-1]:.1f}", f"{samples[-1][1] / 1e6:.2f}"]


def measure(path: Path, candidates: int, requests: int) -> list[list[str]]:
    rng = random.Random(1)
    view = RunView(RunDatabase(path, readonly=True), "bench")
    writer = RunDatabase(path)
    rows = []
    with make_dashboard_server(view, "127.0.0.1", 0) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
        rows.append(summary_row("/api/candidates, cold", [timed_get(conn, "/api/candidates")]))
        rows.append(summary_row("/api/candidates, unchanged", [
            timed_get(conn, "/api/candidates") for _ in range(requests)]))
        rows.append(summary_row("/api/candidates/{id}", [
            timed_get(conn, f"/api/candidates/{rng.randrange(1, candidates + 1)}")
            for _ in range(requests)]))
        changed = []
        for _ in range(5):  # a new candidate is proposed and finishes
            finish(writer, rng, propose(writer, rng, candidates))
            time.sleep(REFRESH_SECONDS * 1.1)  # past the change check's interval
            changed.append(timed_get(conn, "/api/candidates"))
        rows.append(summary_row("/api/candidates, after a write", changed))
        conn.close()
    writer.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="chimera-dashboard-bench-") as tmp:
        path = Path(tmp) / "results.db"
        started = time.perf_counter()
        fill(path, args.candidates)
        console.print(f"wrote {args.candidates:,} candidates in "
                      f"{time.perf_counter() - started:.1f} s ({path.stat().st_size / 1e6:.1f} MB)")
        table = Table(title=f"chimera dashboard, {args.candidates:,} candidates, loopback")
        for column in ("request", "n", "median ms", "p95 ms", "max ms", "MB"):
            table.add_column(column, justify="left" if column == "request" else "right")
        for row in measure(path, args.candidates, args.requests):
            table.add_row(*row)
        console.print(table)


if __name__ == "__main__":
    main()
