"""The meta-learning core: pure torch, no flwr, no ray.

Parameters are ordered ``name -> tensor`` dicts (:mod:`fedmaml.core.params`); models declare their
layer groups (:mod:`fedmaml.models`); adaptation follows a Lambda pattern
(:mod:`fedmaml.core.patterns`, :mod:`fedmaml.core.adaptation`); meta-gradients come from
:mod:`fedmaml.core.estimators`; MOML's memory rules live in :mod:`fedmaml.core.memory`.
Every function here is written with ``torch.func`` so that a client step can be ``vmap``-ed over a
cohort of clients.
"""
