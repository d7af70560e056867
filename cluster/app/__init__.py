"""Orchestration: a run directory and the two pipelines over it, ``chimera evolve`` (data,
strategy, evaluator, database, live view) and ``chimera promote`` (refine, pretrain, SFT,
evaluate)."""
