"""Tasks and federations: the data interface every other layer relies on.

A *task* is one learning problem (in cross-device mode, one client's local distribution). It hands
out fresh training examples for support/query batches and holds a fixed evaluation split. A
*federation* maps stable client ids (partition ids) to the tasks each client holds, and keeps some
clients apart as *unseen* clients that never train.

Tensors: inputs are float32; targets are float32 of shape ``[n, 1]`` for regression and int64 of
shape ``[n]`` for classification.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .counter import Stream

TaskType = Literal["regression", "classification"]


class Task(abc.ABC):
    """One task: a source of training examples plus a fixed evaluation split."""

    #: Number of training examples (the weight of this task in example-weighted averaging).
    num_examples: int

    @classmethod
    @abc.abstractmethod
    def draw_slots(cls, tasks: Sequence["Task"], streams: Stream, n: int) -> tuple[Tensor, Tensor]:
        """``n`` training examples for each of ``S`` slots at once: slot ``s`` draws from
        ``tasks[s]`` (all of this class) with the counter stream ``streams.state[s]``; returns
        ``(x [S, n, ...], y [S, n, ...])``. A slot's examples depend only on its task and its stream,
        never on the other slots, so one client's draw equals its part of a cohort's draw.

        Finite pools sample without replacement when ``n <= num_examples`` and with replacement
        otherwise, so batch shapes never depend on the pool size. Generative tasks draw fresh points.
        Callers draw support and query together (``n = K_s + K_q``) and split, so they are disjoint.
        """

    def draw(self, stream: Stream, n: int) -> tuple[Tensor, Tensor]:
        """``n`` training examples from one stream (``draw_slots`` with one slot)."""
        x, y = type(self).draw_slots([self], stream.flat(), n)
        return x[0], y[0]

    @abc.abstractmethod
    def evaluation_split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(adapt_x, adapt_y, heldout_x, heldout_y)`` for personalized evaluation."""


class PoolTask(Task):
    """A task backed by finite tensors: a training pool and a held-out split."""

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        heldout_x: Tensor,
        heldout_y: Tensor,
        adapt_size: int | None = None,
    ) -> None:
        if len(train_x) == 0:
            raise ValueError("a PoolTask needs at least one training example")
        self.train_x, self.train_y = train_x, train_y
        self.heldout_x, self.heldout_y = heldout_x, heldout_y
        self.num_examples = len(train_x)
        # Evaluation adapts on the first `adapt_size` training examples (all of them by default).
        self.adapt_size = len(train_x) if adapt_size is None else min(adapt_size, len(train_x))

    @classmethod
    def draw_slots(cls, tasks: Sequence[Task], streams: Stream, n: int) -> tuple[Tensor, Tensor]:
        if len(tasks) == 1:  # one slot (a client's step with one task): the same numbers, directly
            t = tasks[0]
            m = t.num_examples  # type: ignore[attr-defined]
            local = (streams.child(0).first_of_permutation(m, n, m) if m >= n
                     else streams.child(1).below(m, n))  # [1, n]
            return t.train_x[local], t.train_y[local]  # type: ignore[attr-defined]
        # The slots' distinct tasks are joined into one pool and every slot's examples are picked
        # with one gather: a slot's indices into its own task, offset to where the task starts.
        first: dict[int, int] = {}
        unique: list[PoolTask] = []
        slot_task = []
        for t in tasks:
            j = first.get(id(t))
            if j is None:
                j = first[id(t)] = len(unique)
                unique.append(t)  # type: ignore[arg-type]
            slot_task.append(j)
        sizes = np.array([t.num_examples for t in unique], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        slot = np.asarray(slot_task, dtype=np.int64)
        size = sizes[slot]
        # Each slot uses one of the two draws; a draw no slot uses is not computed (its values
        # would not depend on the other slots either way).
        enough = size >= n
        local = None
        if enough.any():
            local = streams.child(0).first_of_permutation(size, n, max(int(sizes.max()), n))
        if not enough.all():
            with_replacement = streams.child(1).below(size, n)
            local = (with_replacement if local is None else
                     torch.where(torch.from_numpy(enough)[:, None], local, with_replacement))
        index = torch.from_numpy(starts[slot])[:, None] + local
        if len(unique) == 1:  # one client's steps
            return unique[0].train_x[index], unique[0].train_y[index]
        x = torch.cat([t.train_x for t in unique])
        y = torch.cat([t.train_y for t in unique])
        return x[index], y[index]

    def evaluation_split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k = self.adapt_size
        return self.train_x[:k], self.train_y[:k], self.heldout_x, self.heldout_y


#: A federation keeps the built tasks of its most recently used clients (the least recently used
#: go first): at most this many clients, enough for every client of engines.py's largest cohorts...
CLIENT_TASK_CACHE = 4096
#: ... and at most this many MB of their tensors: tasks sliced out of a data pool are copies, so for
#: a large data set the cache must not grow into a second copy of the pool.
CLIENT_TASK_CACHE_MB = 256


@dataclass(frozen=True)
class Federation:
    """Clients (by stable id) and the tasks each holds; built lazily so a million clients are cheap.

    ``client_tasks(cid)`` and ``unseen_tasks(j)`` are deterministic functions of the data config, the
    seed and the id, so every process (simulation actor or real device) rebuilds the same data.
    """

    num_clients: int
    num_unseen: int
    input_shape: tuple[int, ...]
    num_outputs: int
    task_type: TaskType
    _client_tasks: Callable[[int], list[Task]]
    _unseen_tasks: Callable[[int], list[Task]]
    #: Builds many clients' tasks at once (families that can); must equal ``_client_tasks`` per id.
    _many_client_tasks: Callable[[list[int]], list[list[Task]]] | None = None

    def __post_init__(self) -> None:
        # Building a client's tasks slices the data pool (15-25 us); rounds ask for the same clients
        # again and again, so recently used clients' tasks are kept (never modified by anyone).
        if not isinstance(self._client_tasks, _RecentlyUsed):
            object.__setattr__(self, "_client_tasks",
                               _RecentlyUsed(self._client_tasks, CLIENT_TASK_CACHE))

    def client_tasks(self, cid: int) -> list[Task]:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client id {cid} is outside 0..{self.num_clients - 1}")
        return self._client_tasks(cid)

    def clients_tasks(self, cids: Sequence[int]) -> list[list[Task]]:
        """``client_tasks`` of many clients; clients not recently used are built in one batch
        when the family can (a cohort of 10,000 clients from a million)."""
        bad = [c for c in cids if not 0 <= c < self.num_clients]
        if bad:
            raise IndexError(f"client id(s) {bad[:10]} outside 0..{self.num_clients - 1}")
        return self._client_tasks.many(list(cids), self._many_client_tasks)

    def unseen_tasks(self, j: int) -> list[Task]:
        if not 0 <= j < self.num_unseen:
            raise IndexError(f"unseen client {j} is outside 0..{self.num_unseen - 1}")
        return self._unseen_tasks(j)


class _RecentlyUsed:
    """``fn(key)``, keeping the results of the most recently used keys (see ``CLIENT_TASK_CACHE``).
    Callers get their own list of the shared, never modified, tasks. It pickles as ``fn`` alone:
    the results are rebuilt where it is unpickled (a federation travels to Ray actors lazily)."""

    def __init__(self, fn: Callable[[int], list[Task]], size: int) -> None:
        self.fn, self.size = fn, size
        self.results: OrderedDict[int, tuple[list[Task], int]] = OrderedDict()  # key -> (tasks, bytes)
        self.nbytes = 0

    def __call__(self, key: int) -> list[Task]:
        hit = self.results.get(key)
        if hit is not None:
            self.results.move_to_end(key)
            return list(hit[0])
        tasks = self.fn(key)
        self._keep(key, tasks)
        return list(tasks)

    def many(self, keys: list[int], build: Callable[[list[int]], list[list[Task]]] | None
             ) -> list[list[Task]]:
        """``[self(k) for k in keys]``, the missing ones built by ``build(missing)`` at once."""
        found = {k: self.results[k][0] for k in keys if k in self.results}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing and build is not None:
            built = build(missing)
            found.update(zip(missing, built))
            # a batch larger than the cache would only push its own first clients out again
            for k, tasks in list(zip(missing, built))[-self.size:]:
                self._keep(k, tasks)
        return [list(found[k]) if k in found else self(k) for k in keys]

    def _keep(self, key: int, tasks: list[Task]) -> None:
        size = sum(v.nbytes for t in tasks for v in vars(t).values() if isinstance(v, Tensor))
        self.results[key] = (tasks, size)
        self.nbytes += size
        while self.results and (len(self.results) > self.size
                                or self.nbytes > CLIENT_TASK_CACHE_MB * 2**20):
            _, (_, dropped) = self.results.popitem(last=False)
            self.nbytes -= dropped

    def __reduce__(self) -> tuple:
        return (_RecentlyUsed, (self.fn, self.size))
