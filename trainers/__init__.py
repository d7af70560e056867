"""How to train one thing: corpora, the Arrow token store, candidate/pretrain/SFT loops.

Imports only `chimera`. Filled in by the token-store and `chimera evolve` issues.
"""
