"""Rich rendering of a run: the leaderboard, the workers, the counts and the live view.

Everything here takes candidates of the run database (``CandidateRecord`` objects, or the raw
rows they decode from) and returns rich renderables, so the same code serves the live display of
``chimera evolve`` and ``chimera leaderboard``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from results.records import CandidateRecord, as_records
from search.genome import Genome, genome_changes
from trainers.candidate import Status

Candidates = Sequence[CandidateRecord | Mapping]  # records, or raw rows of the database
STATUS_STYLE = {Status.OK: "green", Status.DIVERGED: "yellow", Status.OUT_OF_MEMORY: "magenta",
                Status.FAILED: "red", Status.RUNNING: "cyan", Status.PENDING: "dim",
                Status.CANCELLED: "dim"}


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def origin(record: CandidateRecord, parent_genomes: Mapping[int, dict]) -> str:
    """How a candidate was made: ``seed``, ``random``, or e.g. ``mutation of 7: dropout
    0>0.1`` (what changed from its first parent, when that parent's genome is known)."""
    if not record.parents:
        return record.operator
    text = f"{record.operator} of {','.join(map(str, record.parents))}"
    first = parent_genomes.get(record.parents[0])
    if first is None:
        return text
    changes = genome_changes(Genome.from_dict(first), Genome.from_dict(record.genome))
    return f"{text}: {changes or 'no expressed change'}"


def leaderboard_table(rows: Candidates, title: str = "leaderboard",
                      parent_genomes: Mapping[int, dict] | None = None) -> Table:
    """``parent_genomes``: the genomes of the rows' parents by id
    (``RunDatabase.parent_genomes``), to show what each child changed."""
    table = Table(title=title, title_justify="left", expand=False)
    for column, justify in (("rank", "right"), ("id", "right"), ("genome", "left"),
                            ("params", "right"), ("tokens", "right"), ("val bpb", "right"),
                            ("tok/s", "right"),
                            ("status", "left"), ("origin", "left")):
        table.add_column(column, justify=justify)
    for rank, row in enumerate(as_records(rows), start=1):
        bpb = row.val_bpb
        table.add_row(str(rank), str(row.id), row.summary, format_params(row.params),
                      # Tokens trained: with hurdles, a candidate stopped at an early rung shows
                      # fewer (and its bits per byte are not comparable with a full one's).
                      format_params(row.tokens), "-" if bpb is None else f"{bpb:.4f}",
                      "-" if row.tokens_per_second is None else f"{row.tokens_per_second:,.0f}",
                      Text(row.status.value, style=STATUS_STYLE.get(row.status, "")),
                      origin(row, parent_genomes or {}))
    return table


def counts_line(counts: dict[str, int]) -> Text:
    done = counts.get("ok", 0)
    parts = [f"done {done}", f"failed {counts.get('failed', 0)}",
             f"diverged {counts.get('diverged', 0)}",
             f"out of memory {counts.get('out_of_memory', 0)}",
             f"rejected {counts.get('rejected', 0)}", f"running {counts.get('running', 0)}",
             f"reused {counts.get('reused', 0)}",
             f"cancelled {counts.get('cancelled', 0)}"]
    return Text("  ".join(parts))


def workers_table(running: Candidates, now: float | None = None) -> Table:
    """What each worker trains now: rows of candidates with status 'running'."""
    now = time.time() if now is None else now
    table = Table(title="workers", title_justify="left")
    for column in ("worker", "candidate", "genome", "for"):
        table.add_column(column)
    for row in as_records(running):
        elapsed = now - (row.started_at or now)
        table.add_row(row.worker or "-", str(row.id), row.summary, f"{elapsed:.0f}s")
    if not running:
        table.add_row("-", "-", "idle", "")
    return table


def budget_bar(elapsed: float, total: float | None, launched: int,
               max_candidates: int | None, flops: tuple[float, float] | None = None) -> Group:
    """Progress through the run's budget: training FLOPs when it has a FLOPs budget, else time
    (with an ETA), else candidates."""
    if flops:
        spent, budget = flops
        fraction = min(1.0, spent / budget)
        label = f"compute {spent:.3g} / {budget:.3g} training FLOPs, {elapsed:,.0f}s"
    elif total:
        fraction = min(1.0, elapsed / total)
        label = f"budget {elapsed:,.0f}s / {total:,.0f}s, ETA {max(0.0, total - elapsed):,.0f}s"
    elif max_candidates:
        fraction = min(1.0, launched / max_candidates)
        label = f"candidates {launched} / {max_candidates}"
    else:
        fraction, label = 0.0, f"candidates {launched}"
    return Group(Text(label), ProgressBar(total=1.0, completed=fraction, width=60), Text(""))


def live_view(leaders: Candidates, running: Candidates, counts: dict[str, int], elapsed: float,
              wall_seconds: float | None, max_candidates: int | None,
              flops: tuple[float, float] | None = None,
              parent_genomes: Mapping[int, dict] | None = None) -> Group:
    """Budget, workers, the best ``leaders`` and the counts: what ``chimera evolve`` shows.
    ``flops``: (training FLOPs spent, the FLOPs budget), when the run has one;
    ``parent_genomes``: as ``leaderboard_table``'s."""
    launched = sum(counts.values()) - counts.get("pending", 0)  # reused ones count too
    return Group(budget_bar(elapsed, wall_seconds, launched, max_candidates, flops),
                 workers_table(running),
                 leaderboard_table(leaders, f"top {len(leaders)}", parent_genomes),
                 counts_line(counts))
