"""Architecture search: genomes, search spaces, genetic operators and strategies.

Decides *what* to train; talks to an evaluator interface and knows nothing of Ray.
Filled in by the `chimera evolve` issue.
"""
