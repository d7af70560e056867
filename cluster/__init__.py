"""The top layer: where things run and how people drive them. May import every other package.

    ray/     the Ray runtime: the actor-pool evaluator and its workers, the node-local store,
             Ray Train pretraining, refinement trials as actors (the only place Ray is used)
    app/     orchestration of a run directory: ``chimera evolve`` and ``chimera promote``
    cli/     the ``chimera`` command line, one module per group of commands
    serve/   ``chimera serve``: the HTTP chat server and its page (no Ray)
"""
