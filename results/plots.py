"""A run's story in three figures (matplotlib, no display needed):

- best-so-far validation bits per byte against compute (worker-hours spent training, in the
  order candidates finished), every candidate as a dot; with hurdles every rung's training
  counts as compute, and only fully trained candidates count towards the best;
- bits per byte against parameters, the Pareto front (fewer parameters, lower bpb) drawn as
  a staircase;
- the winner's lineage: its ancestors by generation and score, edges from parent to child,
  labelled with the operator that made each one.

Each function takes the run database's candidates as ``CandidateRecord`` objects (and its
rungs as ``RungRecord`` objects, with hurdles: ``RunDatabase.candidate_records()`` and
``rung_records()``) and returns a Figure; the caller decides where (and how atomically) to save
it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from results.records import CandidateRecord, RungRecord  # noqa: E402
from trainers.candidate import Status  # noqa: E402

Records = Sequence[CandidateRecord]
Rungs = Sequence[RungRecord]


def trained_ok(rows: Records) -> list[CandidateRecord]:
    """Candidates trained (not reused) that finished ok with a score."""
    return [r for r in rows if r.status is Status.OK and r.reused_from is None
            and r.val_bpb is not None]


def fully_trained(rows: Records, rungs: Rungs = ()) -> list[CandidateRecord]:
    """``trained_ok``, less (with hurdles) the candidates stopped before the last rung: their
    bits per byte after a fraction of the budget are not comparable with the rest."""
    ok = trained_ok(rows)
    if not rungs:
        return ok
    last = max(r.rung for r in rungs)
    reached = {r.candidate_id for r in rungs if r.rung == last}
    return [r for r in ok if r.id in reached]


def compute_and_scores(rows: Records, rungs: Rungs = (), flops: bool = False
                       ) -> list[tuple[float, float | None]]:
    """After each result, in the order results finished: (compute spent so far, the bits per
    byte it scores or None). Compute: worker-seconds of training, or with ``flops`` training
    FLOPs. With hurdles (``rungs``: the run's rung rows) every rung is a result that costs its
    own compute, and only the last rung's results score."""
    if rungs:
        last = max(r.rung for r in rungs)
        # A rung result counts its candidate's training so far: a rung costs the difference.
        so_far = {(r.candidate_id, r.rung): r.train_flops for r in rungs} if flops else {}
        events = [(r.finished_at, so_far[r.candidate_id, r.rung] - so_far.get(
                   (r.candidate_id, r.rung - 1), 0.0) if flops else r.wall_seconds,
                   r.val_bpb if r.rung == last and r.status is Status.OK else None)
                  for r in rungs]
    else:
        events = [(r.finished_at, r.train_flops if flops else r.wall_seconds,
                   r.val_bpb if r.status is Status.OK else None)
                  for r in rows if r.reused_from is None and r.finished_at]
    spent, scored = 0.0, []
    for _, cost, bpb in sorted(events, key=lambda event: event[0]):
        spent += cost or 0.0
        scored.append((spent, bpb))
    return scored


def best_so_far_figure(rows: Records, title: str = "", rungs: Rungs = (),
                       flops: bool = False) -> Figure:
    """Compute in worker-hours, or (``flops``) in training FLOPs."""
    scale = 1.0 if flops else 3600.0
    xs, points, best, best_line = [], [], float("inf"), []
    for spent, bpb in compute_and_scores(rows, rungs, flops=flops):
        if bpb is not None:
            points.append((spent / scale, bpb))
            best = min(best, bpb)
        if best < float("inf"):
            xs.append(spent / scale)
            best_line.append(best)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if points:
        axes.scatter(*zip(*points), s=12, alpha=0.35, label="candidate")
    axes.step(xs, best_line, where="post", linewidth=2, label="best so far")
    axes.set_xlabel("compute (training FLOPs)" if flops else
                    "compute (worker-hours of candidate training)")
    axes.set_ylabel("validation bits per byte")
    axes.set_title(title or "best so far")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def pareto_figure(rows: Records, front_ids: set[int], title: str = "") -> Figure:
    ok = trained_ok(rows)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    others = [r for r in ok if r.id not in front_ids]
    front = sorted((r for r in ok if r.id in front_ids), key=lambda r: r.params)
    if others:
        axes.scatter([r.params for r in others], [r.val_bpb for r in others], s=12,
                     alpha=0.35, label="candidate")
    if front:
        axes.step([r.params for r in front], [r.val_bpb for r in front], where="post",
                  color="tab:red", linewidth=1.5)
        axes.scatter([r.params for r in front], [r.val_bpb for r in front], s=28,
                     color="tab:red", label="Pareto front", zorder=3)
        for row in front:
            axes.annotate(f"#{row.id}", (row.params, row.val_bpb), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel("validation bits per byte")
    axes.set_title(title or "bits per byte against size")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    return figure


def ancestors(rows: Records, winner_id: int) -> dict[int, CandidateRecord]:
    """The winner and every candidate it descends from, by id."""
    by_id = {r.id: r for r in rows}
    found: dict[int, CandidateRecord] = {}
    stack = [winner_id]
    while stack:
        candidate = stack.pop()
        if candidate in found or candidate not in by_id:
            continue
        found[candidate] = by_id[candidate]
        stack.extend(by_id[candidate].parents)
    return found


def lineage_figure(rows: Records, winner_id: int, title: str = "") -> Figure:
    family = ancestors(rows, winner_id)
    figure, axes = plt.subplots(figsize=(8, 5))

    def position(row: CandidateRecord) -> tuple[float, float]:
        return row.generation, row.val_bpb if row.val_bpb is not None else float("nan")

    for row in family.values():
        for parent in row.parents:
            if parent in family:
                (x0, y0), (x1, y1) = position(family[parent]), position(row)
                axes.annotate("", (x1, y1), (x0, y0),
                              arrowprops=dict(arrowstyle="->", alpha=0.5, linewidth=1))
    for row in family.values():
        x, y = position(row)
        winner = row.id == winner_id
        axes.scatter([x], [y], s=60 if winner else 25, zorder=3,
                     color="tab:red" if winner else "tab:blue")
        axes.annotate(f"#{row.id} {row.operator}\n{row.summary}", (x, y), fontsize=6,
                      xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("generation")
    axes.set_ylabel("validation bits per byte")
    axes.set_title(title or f"lineage of #{winner_id}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def curves_figure(curves: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
                  title: str = "") -> Figure:
    """Line plots of named (x, y) series on one axes: training and validation loss curves."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3,
                      label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
