"""Optimised paths of the formulas in rsa_pl.risk and rsa_pl.losses, each tested equal to them.

cvar_search: the CVaR tail boundary without a full-vocabulary sort.
chunked: the per-sequence terms block by block, with a closed-form backward.
"""
