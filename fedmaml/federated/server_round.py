"""One server round over a run axis: what the server does with a round's updates, written once for
a run alone (``R = 1``, :meth:`MetaStrategy.aggregate_train` after decoding the replies) and for a
batch of runs (``R`` live runs, :class:`~fedmaml.engines.run_batch.RunBatch`).

:func:`aggregate_round` takes the updates stacked as ``[runs, clients, ...]`` with a valid mask
``[R, C]`` (the replies that arrived and decoded; ``False`` also pads cohorts of unequal sizes) and
each run's server state (``w`` ``[R, ...]`` and a :class:`~fedmaml.core.server.ServerOptimizer`
whose rate and step count may be per run), and per run:

1. rejects the valid updates holding NaN or inf (counted as ``rejected``);
2. applies the update when at least ``min_replies`` updates remain (or when the run's privacy
   releases every round: a private Poisson round);
3. takes the direction: the algorithm's own server rule (``Algorithm.server_update``), else the
   clipped noisy mean of the run's :class:`~fedmaml.federated.privacy.UpdatePrivacy` (its own noise
   stream and privacy account) when private, else the weighted or uniform mean;
4. steps the server optimizer, and keeps a run whose new ``w`` is not finite out (its ``w`` and
   optimizer state stay as they were; the record says ``diverged``);
5. returns the new ``w`` and a :class:`RoundRecord` per run (the round's part of a metrics row).

A run whose updates arrive summed by part (the sharded engine's shards, when the round takes the
plain mean: no server rule, no privacy) goes through :func:`aggregate_parts`: each part is
:func:`part_sum` of its accepted rows in client-id order (what the mean's own weighted sum does
with them), and the steps after the mean are the same code (:func:`_conclude`).

It imports neither flwr nor ray: decoding replies is the strategy's job (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fedmaml.algorithms import Algorithm, has_server_rule
from fedmaml.config import Config
from fedmaml.core.params import Params, finite_rows
from fedmaml.core.server import (ServerOptimizer, aggregate_stacked, mean_weights, per_run,
                                 weighted_sum_stacked)
from fedmaml.errors import ConfigError
from fedmaml.federated.health import round_outcome
from fedmaml.federated.privacy import UpdatePrivacy, is_private
from fedmaml.results.metrics_row import ROUND_KEYS  # the record's fields, in the row's order

#: Why a run's update was not applied although enough updates arrived (its ``diverged`` key).
DIVERGED = "the aggregated update is not finite (the model would hold NaN or infinite values)"

#: A server rule (``Algorithm.server_update``): ``(stacked [n, ...], weights [n] float64)``.
ServerRule = Callable[[Params, torch.Tensor], Params]


def needs_every_update(config: Config, algorithm: Algorithm) -> bool:
    """Whether this run's server round needs every client's update, not only their sum: the
    algorithm's own server rule, or differential privacy in any form (the private mean clips each
    update). Otherwise the round takes the plain mean, which :func:`aggregate_parts` can take from
    parts summed elsewhere (the sharded engine's shards)."""
    return has_server_rule(algorithm) or is_private(config.privacy)


@dataclass
class RoundRecord:
    """What one run's server round came to: the round's keys of its metrics row (its fields are
    :data:`~fedmaml.results.metrics_row.ROUND_KEYS`, in that order)."""

    clients: list[int]  # sampled ids
    replies: int  # valid updates (arrived, decoded, finite)
    failures: int  # errors, malformed and missing replies, and rejected updates
    failures_by_kind: dict[str, int]  # error, timeout, malformed
    rejected: int  # updates holding NaN/inf
    updated: bool  # whether w changed
    diverged: str | None = None  # why not, when the aggregated update was not finite

    def row(self) -> dict[str, Any]:
        """The metrics-row keys of this record, in the row's order (``diverged`` only when set)."""
        out = {k: getattr(self, k) for k in ROUND_KEYS[:-1]}
        if self.diverged is not None:
            out["diverged"] = self.diverged
        return out


@dataclass
class RoundResult:
    """The outcome of a server round for ``R`` runs (:func:`aggregate_parts`: ``R = 1``)."""

    w: Params  # [R, ...]: the new model of a run that moved, the old one of the others
    moved: torch.Tensor  # [R] bool: w changed
    records: list[RoundRecord]  # per run


@dataclass
class RowsResult(RoundResult):
    """The outcome of :func:`aggregate_round`, which sees the rows: also which it used."""

    accepted: torch.Tensor  # [R, C] bool: valid and finite (the updates used)


def aggregate_round(w: Params, optimizer: ServerOptimizer, updates: Params, valid: torch.Tensor,
                    clients: Sequence[Sequence[int]], *, weighting: str, min_replies: int,
                    counts: torch.Tensor | None = None,
                    failed: Sequence[Sequence[str]] | None = None,
                    missing: Sequence[int] | None = None,
                    privacy: Sequence[UpdatePrivacy | None] | None = None, round_number: int = 0,
                    rule: ServerRule | None = None, finite: bool = False) -> RowsResult:
    """One server round of ``R`` runs (module docstring).

    ``w``: ``[R, ...]``; ``optimizer``: stepped in place (its state ``[R, ...]``; ``lr`` and
    ``steps`` numbers or tensors ``[R]``, ``steps`` a tensor when ``R > 1``); ``updates``:
    ``[R, C, ...]``; ``valid``: ``[R, C]`` bool; ``clients``: each run's sampled ids (its record's
    ``clients``); ``counts``: ``[R, C]`` example counts (needed with ``weighting="weighted"`` and
    by a server ``rule``); ``failed``: per run, the kind (``error``, ``malformed``, ``rejected``) of
    every reply not in ``updates``; ``missing``: per run, sampled clients that did not reply;
    ``privacy``: per run, its private mean and account (``None`` or disabled: the plain mean;
    ``len(clients[r])`` is its denominator without an account); ``round_number``: the round (it
    keys each run's noise stream); ``rule``: the algorithm's own server rule, applied run by run;
    ``finite``: the caller has already rejected every valid update holding NaN or inf (a run
    alone's decoder does, R.stack_from_records), so step 1 has nothing to find."""
    runs = valid.shape[0]
    if weighting not in ("weighted", "uniform"):
        raise ValueError(f"aggregation must be 'weighted' or 'uniform', got {weighting!r}")
    if weighting == "weighted" and counts is None:
        raise ValueError("weighted aggregation needs the updates' example counts")
    if runs > 1 and not isinstance(optimizer.steps, torch.Tensor):
        raise ValueError(f"a server round of {runs} runs needs the optimizer's steps per run "
                         "(a tensor [R])")
    accepted = valid if finite else valid & finite_rows(updates, 2)
    n_valid = accepted.sum(1)
    privacy = list(privacy) if privacy is not None else [None] * runs
    updated = n_valid >= min_replies
    every_round = [p is not None and p.releases_every_round for p in privacy]
    if any(every_round):  # a private Poisson run releases its noise whoever replied
        updated |= torch.tensor(every_round)
    sampled = [len(c) for c in clients]
    new_w, moved, records = _conclude(
        w, optimizer, updated,
        lambda: _direction(w, updates, counts, accepted, weighting, privacy, rule, round_number,
                           sampled, updated),
        valid.sum(1).tolist(), n_valid.tolist(), clients, failed, missing)
    return RowsResult(new_w, moved, records, accepted)


@dataclass
class PartSum:
    """A part of one run's accepted updates (a shard's) reduced for the mean: the weighted sum of
    its rows taken in client-id order (:func:`part_sum`), their weight total and their count."""

    total: Params
    weight: float
    rows: int


def part_sum(stacked: Params, counts: Sequence[int], weighting: str) -> PartSum:
    """The part of the mean held by the accepted updates ``stacked`` (``[n, ...]``, rows in
    client-id order; their example ``counts``): what a shard sends instead of its rows when the
    round needs no row by itself (:func:`aggregate_parts`)."""
    weights = mean_weights(list(counts), weighting)
    if not weights:
        return PartSum({k: v.new_zeros(v.shape[1:]) for k, v in stacked.items()}, 0.0, 0)
    return PartSum(weighted_sum_stacked(stacked, weights), sum(weights), len(weights))


def aggregate_parts(w: Params, optimizer: ServerOptimizer, parts: Sequence[PartSum],
                    clients: Sequence[int], *, min_replies: int, failed: Sequence[str] = (),
                    missing: int = 0) -> RoundResult:
    """:func:`aggregate_round` for one run (``R = 1``) whose accepted updates arrive summed by part
    (:func:`part_sum`, e.g. by the shards of the sharded engine): the same steps with the plain
    mean, which is the parts' sums added in the order given over their weights added alike. One
    part gives the numbers of :func:`aggregate_round` on its rows to the bit; several, to float
    rounding. A server rule or a private mean needs every update: those rounds send rows.
    ``failed`` holds the kind of every reply not in a part (``rejected`` for non-finite updates,
    which the parts leave out)."""
    parts = [p for p in parts if p.rows]
    kept = sum(p.rows for p in parts)
    updated = torch.tensor([kept >= min_replies])

    def direction() -> Params:
        if not parts:
            raise ValueError("mean of no parameter dicts")
        total, weight = dict(parts[0].total), parts[0].weight
        for p in parts[1:]:
            total = {k: total[k] + p.total[k] for k in total}
            weight += p.weight
        if weight <= 0:
            raise ValueError(f"weights must sum to a positive number, got {weight}")
        return {k: (total[k] / weight).unsqueeze(0) for k in w}

    new_w, moved, records = _conclude(w, optimizer, updated, direction, [kept], [kept],
                                      [clients], [list(failed)], [missing])
    return RoundResult(new_w, moved, records)


def _conclude(w: Params, optimizer: ServerOptimizer, updated: torch.Tensor,
              direction: Callable[[], Params], arrived: list[int], kept: list[int],
              clients: Sequence[Sequence[int]], failed: Sequence[Sequence[str]] | None,
              missing: Sequence[int] | None) -> tuple[Params, torch.Tensor, list[RoundRecord]]:
    """The steps every server round ends with: the optimizer's step along ``direction()`` for the
    runs that update (it is taken only when one does), the divergence check, a record per run."""
    runs = updated.shape[0]
    new_w, moved = w, torch.zeros(runs, dtype=torch.bool)
    if bool(updated.any()):
        new_w, moved = _step(w, optimizer, direction(), updated)
    # Python numbers: a record per run is read out of them (no tensor op per run)
    moved_, updated_ = moved.tolist(), updated.tolist()
    records = []
    for r in range(runs):
        kinds = [*(failed[r] if failed is not None else ()), *["rejected"] * (arrived[r] - kept[r])]
        record = RoundRecord(list(clients[r]), kept[r], updated=moved_[r],
                             **round_outcome(kinds, missing[r] if missing is not None else 0))
        if updated_[r] and not moved_[r]:
            record.diverged = DIVERGED
        records.append(record)
    return new_w, moved, records


def _direction(w: Params, updates: Params, counts: torch.Tensor | None, accepted: torch.Tensor,
               weighting: str, privacy: list[UpdatePrivacy | None], rule: ServerRule | None,
               round_number: int, sampled: list[int], updated: torch.Tensor) -> Params:
    """``[R, ...]``: the direction each run's optimizer steps along (any finite value for a run
    that does not update: its step is undone)."""
    runs = accepted.shape[0]
    if runs > 1 and rule is None and not any(p is not None and p.enabled for p in privacy):
        return _batched_mean(updates, counts, accepted, weighting)
    # Run by run: a run alone (R = 1) keeps the arithmetic it always had (aggregate_stacked's
    # chunked sums; a batched matmul differs from it in the last bits), and a private run draws
    # its noise from its own stream and counts the release in its own account.
    out = []
    for r in range(runs):
        if not bool(updated[r]):
            out.append({k: torch.zeros_like(v[r]) for k, v in w.items()})
            continue
        rows = accepted[r]
        every = bool(rows.all())
        stacked = {k: v[r] if every else v[r][rows] for k, v in updates.items()}
        weights = (counts[r][rows].tolist() if weighting == "weighted"
                   else [1.0] * int(rows.sum()))
        p = privacy[r]
        if rule is not None and weights:
            out.append(_checked_rule_output(
                rule, rule(stacked, torch.tensor(weights, dtype=torch.float64)), w))
        elif p is not None and p.enabled:
            out.append(p.mean_update(round_number, stacked, num_sampled=sampled[r]))
        else:
            out.append(aggregate_stacked(stacked, weights, weighting))
    if runs == 1:  # a run alone: the run axis as a view, not a copy
        return {k: out[0][k].unsqueeze(0) for k in w}
    return {k: torch.stack([d[k] for d in out]) for k in w}


def _checked_rule_output(rule: ServerRule, direction: Any, w: Params) -> Params:
    """A server rule's ``direction``, refused unless it holds one floating tensor per parameter,
    shaped as the parameter: a rule that returns the stacked updates unreduced would otherwise be
    broadcast into ``w``, and the run could end ``completed`` with a model of the wrong shape."""
    def where() -> str:  # the message is made only for a rule that fails
        return f"algorithm.name: {getattr(rule, '__qualname__', repr(rule))}"

    if not isinstance(direction, dict) or set(direction) != set(w):
        got = sorted(direction) if isinstance(direction, dict) else type(direction).__name__
        raise ConfigError(f"{where()} returned {got}; it must return a dict with one tensor per "
                          f"parameter: {', '.join(w)}")
    for k, v in direction.items():
        shape = w[k].shape[1:]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != shape:
            got = (f"shape {list(v.shape)} ({v.dtype})" if isinstance(v, torch.Tensor)
                   else type(v).__name__)
            raise ConfigError(f"{where()} returned {got} for parameter {k!r}; it must be a "
                              f"floating tensor of the parameter's shape {list(shape)}: reduce "
                              "the stacked updates over their leading (client) axis")
    return direction


def _batched_mean(updates: Params, counts: torch.Tensor | None, accepted: torch.Tensor,
                  weighting: str) -> Params:
    """``[R, ...]``: each run's weighted or uniform mean of its accepted updates, for all runs at
    once. A rejected update (weight 0) may hold NaN, so it is zeroed rather than multiplied."""
    width = accepted.shape[1]
    if weighting == "uniform" and width and bool(accepted.all()):  # the usual round
        return {k: v.sum(1) / width for k, v in updates.items()}
    base = counts.to(torch.float64) if weighting == "weighted" else torch.ones(accepted.shape,
                                                                              dtype=torch.float64)
    weights = base * accepted
    total = weights.sum(1).clamp_min(1e-300)  # a run with no update: its step is undone
    every = bool(accepted.all())  # no NaN to keep out: the masking copy is not needed
    out = {}
    for k, v in updates.items():
        wts = weights.to(v.dtype).reshape(weights.shape + (1,) * (v.dim() - 2))
        if not every:
            v = torch.where(wts > 0, v, torch.zeros((), dtype=v.dtype))
        out[k] = (wts * v).sum(1) / total.to(v.dtype).reshape((-1,) + (1,) * (v.dim() - 2))
    return out


def _step(w: Params, optimizer: ServerOptimizer, direction: Params, updated: torch.Tensor
          ) -> tuple[Params, torch.Tensor]:
    """Step every run; a run that does not update, or whose new ``w`` is not finite, keeps its
    ``w`` and optimizer state. Returns the new ``w`` and which runs moved."""
    old_state = dict(optimizer.state)
    old_steps = optimizer.steps.clone() if isinstance(optimizer.steps, torch.Tensor) \
        else optimizer.steps
    stepped = optimizer.step(w, direction)
    moved = updated & finite_rows(stepped, 1)
    if not bool(moved.any()):
        optimizer.state, optimizer.steps = old_state, old_steps
        return w, moved
    if not bool(moved.all()):
        stepped = {k: torch.where(per_run(moved, v), v, w[k]) for k, v in stepped.items()}
        optimizer.state = {k: torch.where(per_run(moved, v), v,
                                          old_state.get(k, torch.zeros_like(v)))
                           for k, v in optimizer.state.items()}
        optimizer.steps = torch.where(moved, optimizer.steps, old_steps)
    return stepped, moved
