"""Optimised paths of the formulas in rsa_pl.risk and rsa_pl.losses, each tested equal to them.

cvar: the CVaR boundary without a full-vocabulary sort, its value and weights in fewer passes.
chunked: the per-sequence terms block by block, with a closed-form backward.
"""
