"""A run's candidates as one Parquet file: a row per candidate, the genes as their own columns,
lineage as a list column, every metric, and the full result as JSON. Readable by pandas, duckdb
or polars::

    duckdb -c "select id, d_model, n_layers, val_bpb from 'run.parquet' order by val_bpb limit 5"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from results.records import CandidateRecord

GENE_TYPES = {"d_model": pa.int64(), "n_layers": pa.int64(), "n_heads": pa.int64(),
              "n_kv_heads": pa.int64(), "ffn_multiplier": pa.float64(),
              "recurrence_ratio": pa.int64(), "window_size": pa.int64(),
              "dropout": pa.float64(), "mlp_type": pa.string(), "qk_norm": pa.bool_(),
              "parallel_block": pa.bool_(), "tie_embeddings": pa.bool_(),
              "rope_theta": pa.float64()}
SCHEMA = pa.schema([
    ("id", pa.int64()), ("genome_key", pa.string()), ("summary", pa.string()),
    *GENE_TYPES.items(),
    ("parents", pa.list_(pa.int64())), ("operator", pa.string()), ("generation", pa.int64()),
    ("status", pa.string()), ("reused_from", pa.int64()), ("attempts", pa.int64()),
    ("val_loss", pa.float64()), ("val_bpb", pa.float64()), ("params", pa.int64()),
    ("non_embedding_params", pa.int64()), ("tokens", pa.int64()),
    ("tokens_per_second", pa.float64()), ("train_flops", pa.float64()),
    ("wall_seconds", pa.float64()), ("peak_memory_mb", pa.float64()), ("error", pa.string()),
    ("worker", pa.string()),
    ("created_at", pa.timestamp("ms", tz="UTC")), ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")), ("result", pa.string()),
])


def _record(candidate: CandidateRecord) -> dict:
    data = candidate.to_dict()
    record = {name: data[name] for name in SCHEMA.names if name not in GENE_TYPES}
    record.update({gene: candidate.genome.get(gene) for gene in GENE_TYPES})
    # the full result as the JSON text the database holds
    record["result"] = None if candidate.result is None else json.dumps(candidate.result)
    for stamp in ("created_at", "started_at", "finished_at"):  # unix seconds -> milliseconds
        record[stamp] = None if data[stamp] is None else int(data[stamp] * 1000)
    return record


def candidates_table(rows: Sequence[CandidateRecord]) -> pa.Table:
    """The run database's candidates (``RunDatabase.candidate_records()``) as an Arrow table
    with a fixed schema (stable column types even when a column is all null)."""
    return pa.Table.from_pylist([_record(row) for row in rows], schema=SCHEMA)


def write_parquet(rows: Sequence[CandidateRecord], path: str | Path) -> int:
    """Write the candidates ``rows`` as Parquet to ``path``; the number of rows. (Callers that
    replace a file others may read write to a temporary path and rename it, see
    ``chimera export``.)"""
    table = candidates_table(rows)
    pq.write_table(table, str(path))
    return table.num_rows
