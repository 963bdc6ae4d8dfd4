"""What the client library reads from a run's setup (``fedmaml.federated.setup.ExperimentSetup``
has all of it; naming it here keeps the library below the federated layer)."""

from __future__ import annotations

from typing import Any, Protocol

from fedmaml.algorithms import Algorithm, Hyper
from fedmaml.config import Config
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.data.tasks import Federation


class ClientSetup(Protocol):
    config: Config
    algorithm: Algorithm
    model: Any  # a StagedModel
    loss_fn: Any
    federation: Federation
    initial_params: Params
    hyper: Hyper
    eval_pattern: Pattern
    eval_alpha: float
    classification: bool
