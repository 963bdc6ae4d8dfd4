"""``fedmaml tune``: search step sizes (or any config values) with candidates trained on several
seeds as vectorized batches, successive halving at rungs, and a robust choice (docs/tuning.md).

Modules, each with one job: :mod:`~fedmaml.tune.space` (``--space`` parsing, grids, samples, edges),
:mod:`~fedmaml.tune.metric` (the measured number and its clients), :mod:`~fedmaml.tune.search`
(grid, random, TPE), :mod:`~fedmaml.tune.halving` (rungs and promotion),
:mod:`~fedmaml.tune.selection` (the choice and its rules), :mod:`~fedmaml.tune.tuner` (the loop and
the tuning directory), :mod:`~fedmaml.tune.report` (table, figure, JSON) and
:mod:`~fedmaml.tune.cli` (the command's arguments; standard library only, so that building the
CLI's parser stays fast: this package imports nothing at import either).
"""
