"""The client library: a client's round as transport-free functions (no flwr, no ray).

The ClientApp (fedmaml/federated/client_app.py) decodes a message, calls these and encodes the
reply; the vectorized engine (fedmaml/engines/vectorized.py) calls them for a cohort; a batch of
runs (fedmaml/engines/run_batch.py, batch_evaluation.py) for ``[runs, clients]``. Each decision
is a function of ``(seed, client id, round)``, so all of them decide alike:

* :mod:`~fedmaml.client.train`: the data draw, the memory initialisation decision, the update
  (:func:`train_step` for one client with its memory store), client-side clipping;
* :mod:`~fedmaml.client.update`: the update vmapped over a cohort and over a batch of runs;
* :mod:`~fedmaml.client.faults`: injected faults (which clients fail, straggle, drop out);
* :mod:`~fedmaml.client.speed`: simulated compute speed and the round-deadline judgement;
* :mod:`~fedmaml.client.metrics`: the reply's metric names and columns;
* :mod:`~fedmaml.client.evaluate`: a client's evaluation and its memory's diagnostics.
"""

from fedmaml.client.evaluate import evaluate_client
from fedmaml.client.faults import CohortFaults, InjectedFault, client_fault, cohort_faults
from fedmaml.client.metrics import samples_drawn, train_columns, train_metrics
from fedmaml.client.speed import past_deadline, speed_multipliers
from fedmaml.client.store import MemoryStore, NoMemory
from fedmaml.client.train import (clip_client_updates, draw_client_round, draw_cohort_round,
                                  initial_for, memory_init_mask, needs_memory_init, to_device,
                                  train_step, training_tasks)
from fedmaml.client.update import (CompiledUpdate, cohort_update, initial_memories, runs_update,
                                   stack_rounds)

__all__ = ["CohortFaults", "InjectedFault", "MemoryStore", "NoMemory", "client_fault",
           "CompiledUpdate", "clip_client_updates", "cohort_faults", "cohort_update", "draw_client_round",
           "draw_cohort_round", "evaluate_client", "initial_for", "initial_memories",
           "memory_init_mask", "needs_memory_init", "past_deadline", "runs_update",
           "samples_drawn", "speed_multipliers", "stack_rounds", "to_device", "train_columns",
           "train_metrics", "train_step", "training_tasks"]
