"""What happened: the run database, leaderboards (rich), plots and exports.

Imports nothing of ours but plain data types. Filled in by the `chimera evolve` issue.
"""
