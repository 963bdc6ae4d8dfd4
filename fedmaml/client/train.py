"""A client's train round, transport-free: data draw, memory initialisation, update, clipping,
simulated time and metrics.

Every function works for one client and for a cohort (ids as arrays; for a batch of runs
``[runs, clients]`` with one seed per run), so the ClientApp (one client per message), the
vectorized engine (a cohort) and a batch of runs make the same decisions from the same
``(seed, client id, round)`` streams.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmaml.algorithms import Hyper, RoundData, client_update, draw_cohort, draw_round
from fedmaml.config import Config
from fedmaml.core.params import Params
from fedmaml.core.privacy import clip_stacked, clip_update
from fedmaml.data.counter import round_keys
from fedmaml.data.tasks import Task
from fedmaml.client.metrics import MEMORY_RESET, train_metrics
from fedmaml.client.setup import ClientSetup
from fedmaml.client.speed import client_seconds
from fedmaml.client.store import MemoryStore, was_reset


def to_device(params: Params, device: torch.device | str) -> Params:
    return {k: v.to(device) for k, v in params.items()}


def training_tasks(setup: ClientSetup, cid: int) -> list[Task]:
    """A training client's tasks (an unseen client cannot train)."""
    if cid >= setup.federation.num_clients:
        raise ValueError(f"client {cid} is an unseen (evaluation-only) client and cannot train")
    return setup.federation.client_tasks(cid)


def memory_init_mask(uses_memory: bool, hp: Hyper, has_memory: Any) -> np.ndarray:
    """Which clients (re)initialise their memory this round (any shape, as ``has_memory``): those
    without one, or all under ``memory_policy: reinit``; none when the algorithm keeps none."""
    has = np.asarray(has_memory, dtype=bool)
    if not uses_memory:
        return np.zeros(has.shape, dtype=bool)
    if hp.memory_policy == "reinit":
        return np.ones(has.shape, dtype=bool)
    return ~has


def needs_memory_init(setup: ClientSetup, hp: Hyper, has_memory: bool) -> bool:
    """:func:`memory_init_mask` of one client, as a bool (without its array work)."""
    if not setup.algorithm.uses_memory:
        return False
    return hp.memory_policy == "reinit" or not has_memory


def initial_for(setup: ClientSetup, hp: Hyper, device: torch.device | str) -> Params | None:
    """The initial meta-model, when first memories adapt it (``algorithm.memory_init``)."""
    return to_device(setup.initial_params, device) if hp.memory_init == "initial_model" else None


def draw_client_round(cfg: Config, setup: ClientSetup, cid: int, hp: Hyper, server_round: int,
                      fresh: bool) -> tuple[list[Task], RoundData]:
    """A training client's tasks and its round's data, from its own (seed, id, round) stream."""
    tasks = training_tasks(setup, cid)
    data = draw_round(tasks, hp, round_keys(cfg.seed, [cid], server_round)[0],
                      extra=setup.algorithm.needs_extra_batch(hp), init=fresh)
    return tasks, data


def draw_cohort_data(setup: ClientSetup, hp: Hyper, tasks: Sequence[Sequence[Task]],
                     keys: np.ndarray, fresh: bool) -> RoundData:
    """The round data of clients whose round keys are ``keys`` (any shape, flattened: one client
    per key, in order), stacked along a leading client axis: each client's part equals its own
    draw (:func:`draw_client_round`)."""
    return draw_cohort(tasks, hp, np.asarray(keys).reshape(-1),
                       extra=setup.algorithm.needs_extra_batch(hp), init=fresh)


def draw_cohort_round(cfg: Config, setup: ClientSetup, cids: list[int], hp: Hyper,
                      server_round: int, fresh: bool, tasks: list[list[Task]] | None = None
                      ) -> tuple[list[list[Task]], RoundData]:
    """:func:`draw_client_round` for many clients at once (equal numbers of tasks). ``tasks``: the
    clients' tasks, if the caller has them already."""
    tasks = [training_tasks(setup, cid) for cid in cids] if tasks is None else tasks
    return tasks, draw_cohort_data(setup, hp, tasks, round_keys(cfg.seed, cids, server_round),
                                   fresh)


def clip_client_updates(cfg: Config, delta: Params, client_axes: int = 1) -> Params:
    """Updates stacked along ``client_axes`` leading axes (``[C, ...]``, or ``[R, C, ...]`` for a
    batch of runs), each clipped to ``privacy.clipping_norm`` under ``privacy.clipping: client``
    (the update leaves the device within the DP bound), else unchanged."""
    if cfg.privacy.clipping != "client":
        return delta
    lead = next(iter(delta.values())).shape[:client_axes]
    clipped, _ = clip_stacked({k: v.flatten(0, client_axes - 1) for k, v in delta.items()},
                              cfg.privacy.clipping_norm)
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in clipped.items()}


def train_step(cfg: Config, setup: ClientSetup, cid: int, w: Params, hp: Hyper,
               server_round: int, store: MemoryStore, device: torch.device,
               start: float | None = None) -> tuple[Params, dict[str, Any]]:
    """One client's update from a decoded instruction: memory -> data -> client update -> memory.
    Returns the update ``w - w_r`` (clipped with ``privacy.clipping: client``) and the reply's
    metrics (``train-seconds`` counted from ``start``, default now, times the client's simulated
    speed multiplier, ``participation.speed``)."""
    start = time.perf_counter() if start is None else start
    memory = store.load() if setup.algorithm.uses_memory else None
    memory = None if memory is None else to_device(memory, device)
    fresh = needs_memory_init(setup, hp, memory is not None)
    tasks, data = draw_client_round(cfg, setup, cid, hp, server_round, fresh)
    delta, memory, metrics = client_update(setup.algorithm, setup.model, setup.loss_fn, hp, w,
                                           memory, data.to(device), initial_for(setup, hp, device))
    if memory is not None:
        store.save(memory)
    if cfg.privacy.clipping == "client":  # the update leaves the device within the DP bound
        delta = clip_update(delta, cfg.privacy.clipping_norm)
    seconds = client_seconds(cfg.participation, cfg.seed, cid, time.perf_counter() - start)
    reply = train_metrics(cid, tasks, data, metrics, seconds)
    if was_reset(store):
        reply[MEMORY_RESET] = 1
    return delta, reply
