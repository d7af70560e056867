"""Where things run: the Ray runtime, actor-pool evaluator and the `chimera` command line.

The top layer: may import every other package.
"""
