"""Who can take part in a round: participation models for cross-device sampling.

A round's cohort is drawn uniformly, without replacement, among the clients **available** that
round. The models differ in who is available:

* ``uniform``: everybody, every round (the classic FedAvg sampling).
* ``heterogeneous``: client ``i`` is available with its own probability
  ``p_i ~ Beta(beta_a, beta_b)``, drawn once per run, independently each round. Some clients come
  often, others rarely.
* ``markov``: each client is a two-state (on/off) Markov chain over rounds: an available client
  leaves with probability ``markov_on_to_off``, an absent one returns with ``markov_off_to_on``.
  Clients stay away for stretches (mean absent stretch ``1 / markov_off_to_on`` rounds); in the long
  run a client is available a fraction ``off_to_on / (on_to_off + off_to_on)`` of the rounds.
  Round 1 starts from that stationary distribution.
* ``diurnal``: client ``i`` is available at round ``r`` with probability
  ``diurnal_mean + diurnal_amplitude * cos(2 pi (r / diurnal_period - phase_i))``, independently
  each round; the phases (time zones) are uniform over ``diurnal_phase_spread`` of a period (0 =
  everybody in step).

**Shortfall**: when fewer clients are available than the cohort size, the cohort is every available
client (possibly none). The round then has fewer participants; when they are fewer than
``federated.min_replies`` the model is not updated that round, exactly as when replies are missing.

**Sampling scheme** (``federated.sampling``, :class:`ClientSampling`): ``fixed`` draws exactly
``k`` clients as above; ``poisson`` takes each available client independently with probability
``q`` (a coin per ``(seed, round, client)``), so the cohort's size varies around ``q n`` and can be
0. Cross-silo takes everybody. The scheme fixes the server's denominator and the privacy account
(docs/privacy.md).

**Compute speed** (:func:`fedmaml.client.speed.speed_multipliers`) is separate from availability: a per-client factor on
the simulated train time (``participation.speed``), so that under a round deadline the slow clients
are the stragglers.

Everything is a pure function of ``(seed, round)`` and the number of clients: per-client constants
(``p_i``, phases) come from a generator keyed by the seed, each round's availability and cohort
from one keyed by ``(seed, round)``, so every engine and every process draws the same cohorts. The
Markov chain's state at round ``r`` depends on the earlier rounds; it is advanced from the last
round asked (or recomputed from round 1), so asking rounds in order costs one step each.
The work per round is O(k) for ``uniform`` and vectorized numpy over all clients otherwise (a
million clients took 15-80 ms per round, docs/participation.md). No Flower, no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmaml.config import PARTICIPATION_MODELS, FederatedConfig, ParticipationConfig
from fedmaml.data.counter import derive_keys, sample_without_replacement, splitmix64

#: Up to this many values, counting in Python is faster than NumPy's array machinery.
SMALL = 64

# Stream tags: independent generators for independent uses of the same seed.
_COHORT, _AVAILABLE, _CLIENT_CONSTANTS, _MARKOV_START, _POISSON = 0xC1, 0xA8, 0xA7, 0xA9, 0xB0


def sample_clients(seed: int, server_round: int, num_clients: int, k: int) -> list[int]:
    """``k`` distinct client ids for a round among all clients, a function of (seed, round) only
    (a counter-based stream, so the runs of a vectorized sweep sample theirs at once:
    :func:`sample_cohorts`)."""
    return sample_cohorts(np.asarray([seed]), server_round, num_clients, k)[0].tolist()


def sample_cohorts(seeds: np.ndarray, server_round: int, num_clients: int, k: int) -> np.ndarray:
    """``[R, k]``: :func:`sample_clients` of each seed, in one vectorized draw."""
    seeds = np.asarray(seeds).reshape(-1)
    if len(seeds) == 1:  # a run alone: the scalar path of the same keys (a few small arrays fewer)
        keys = derive_keys(int(seeds[0]), [server_round], _COHORT)
    else:
        keys = derive_keys(seeds, np.full((len(seeds), 1), server_round), _COHORT)[:, 0]
    return sample_without_replacement(keys, num_clients, k)


@dataclass(frozen=True)
class ClientSampling:
    """How a round's clients are drawn: what the server's denominator and the privacy account
    follow from (docs/privacy.md).

    ``scheme``: ``all`` (cross-silo: every client every round), ``fixed`` (``size`` clients drawn
    uniformly without replacement), ``poisson`` (each client independently with probability
    ``rate``). ``rate`` is the chance that a given client is asked in a round: ``size / population``
    for ``all`` and ``fixed``."""

    scheme: str
    population: int
    size: int  # clients asked per round (all, fixed); for poisson its expected count, rounded
    rate: float

    @property
    def expected_size(self) -> float:
        """Clients asked per round on average: ``size``, or ``rate * population`` for poisson."""
        return self.rate * self.population if self.scheme == "poisson" else float(self.size)


def client_sampling(fed: FederatedConfig, num_clients: int) -> ClientSampling:
    """The sampling scheme of ``federated.*`` over ``num_clients`` clients."""
    n = num_clients
    if fed.mode == "cross_silo":
        return ClientSampling("all", n, n, 1.0)
    if fed.sampling == "poisson":
        rate = min(fed.clients_per_round / n, 1.0) if fed.clients_per_round else fed.fraction
        return ClientSampling("poisson", n, max(1, round(rate * n)), rate)
    k = min(fed.clients_per_round or max(1, round(fed.fraction * n)), n)
    return ClientSampling("fixed", n, k, k / n)


def poisson_mask(seed: int, server_round: int, num_clients: int, rate: float) -> np.ndarray:
    """A boolean mask over client ids: each client in with probability ``rate``, by a coin that is
    a function of ``(seed, round, client id)`` only (a counter-based hash, as every engine and
    process must draw the same cohort). O(n) vectorized numpy a round."""
    keys = derive_keys(seed, np.arange(num_clients), (1 << 62) | (server_round << 8) | _POISSON)
    u = (splitmix64(keys, 1)[:, 0] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1)
    return u < rate


class Participation:
    """Availability and cohorts of one run (``seed``, ``num_clients``) under ``spec`` (the config's
    ``participation`` section)."""

    def __init__(self, spec: ParticipationConfig, seed: int, num_clients: int) -> None:
        if spec.model not in PARTICIPATION_MODELS:
            raise ValueError(f"participation model {spec.model!r} is not one of "
                             f"{', '.join(PARTICIPATION_MODELS)}")
        self.spec, self.seed, self.n = spec, seed, num_clients
        self._constants: np.ndarray | None = None  # p_i (heterogeneous) or phase_i (diurnal)
        self._markov: tuple[int, np.ndarray] | None = None  # (round, state)
        self.last_available: int | None = None  # clients available in the last cohort's round

    # -- per-client constants -------------------------------------------------------------------
    def constants(self) -> np.ndarray:
        if self._constants is None:
            rng = np.random.default_rng([self.seed, _CLIENT_CONSTANTS])
            s = self.spec
            if s.model == "heterogeneous":
                self._constants = rng.beta(s.beta_a, s.beta_b, size=self.n)
            else:
                self._constants = rng.random(self.n) * s.diurnal_phase_spread
        return self._constants

    def probability(self, server_round: int) -> np.ndarray | float:
        """Each client's probability of being available at ``server_round`` (before conditioning on
        its past: for ``markov`` this is the stationary probability)."""
        s = self.spec
        if s.model == "uniform":
            return 1.0
        if s.model == "heterogeneous":
            return self.constants()
        if s.model == "markov":
            return s.markov_off_to_on / (s.markov_on_to_off + s.markov_off_to_on)
        return np.clip(s.diurnal_mean + s.diurnal_amplitude * np.cos(
            2 * math.pi * (server_round / s.diurnal_period - self.constants())), 0.0, 1.0)

    # -- availability ---------------------------------------------------------------------------
    def available(self, server_round: int) -> np.ndarray | None:
        """A boolean mask over client ids of the clients available at ``server_round`` (``None``
        for ``uniform``: everybody)."""
        s = self.spec
        if s.model == "uniform":
            return None
        if s.model == "markov":
            return self._markov_state(server_round)
        u = np.random.default_rng([self.seed, server_round, _AVAILABLE]).random(self.n)
        return u < self.probability(server_round)

    def _markov_state(self, server_round: int) -> np.ndarray:
        s = self.spec
        if self._markov is None or self._markov[0] > server_round:
            start = np.random.default_rng([self.seed, _MARKOV_START]).random(self.n)
            self._markov = (1, start < self.probability(1))
        r, state = self._markov
        while r < server_round:
            r += 1
            u = np.random.default_rng([self.seed, r, _AVAILABLE]).random(self.n)
            # on stays on unless it draws below on_to_off; off turns on if it draws below off_to_on
            state = np.where(state, u >= s.markov_on_to_off, u < s.markov_off_to_on)
        self._markov = (r, state)
        return state

    # -- the cohort -----------------------------------------------------------------------------
    def cohort(self, server_round: int, k: int, poisson_rate: float | None = None) -> list[int]:
        """Up to ``k`` distinct client ids, uniformly among the available ones; every available
        client when fewer than ``k`` are (see the module docstring). With ``poisson_rate``: each
        available client independently with that probability (``k`` unused), sorted by id."""
        mask = self.available(server_round)
        self.last_available = None if mask is None else int(mask.sum())
        if poisson_rate is not None:
            picked = poisson_mask(self.seed, server_round, self.n, poisson_rate)
            return [int(c) for c in np.flatnonzero(picked if mask is None else picked & mask)]
        if mask is None:
            return sample_clients(self.seed, server_round, self.n, min(k, self.n))
        ids = np.flatnonzero(mask)
        if len(ids) <= k:
            return [int(c) for c in ids]
        return [int(ids[j]) for j in sample_clients(self.seed, server_round, len(ids), k)]


class Staleness:
    """Rounds since each sampled client's previous participation (pure bookkeeping, O(k) a round).

    A client *participates* in a round when it is sampled for it: its memory is refreshed when it
    runs the round, even if its reply then arrives too late to count. ``record`` is idempotent per
    round (asking a round's cohort twice counts it once).
    """

    def __init__(self, num_clients: int) -> None:
        self.last = np.full(num_clients, -1, dtype=np.int64)  # last participation round, -1 = never
        self.last_round = 0
        self.window: dict[int, int] = {}  # gap -> count since the last evaluation (0 = first)
        self.total: dict[int, int] = {}  # gap -> count over the run

    def record(self, server_round: int, cids: list[int]) -> None:
        if server_round <= self.last_round or not cids:
            return
        self.last_round = server_round
        ids = np.asarray(cids, dtype=np.int64)
        prev = self.last[ids]
        gaps = np.where(prev < 0, 0, server_round - prev)
        self.last[ids] = server_round
        self.add_gaps(gaps)

    def add_gaps(self, gaps: np.ndarray) -> None:
        """Count participations with these gaps (0 = first) in the window and the run's total."""
        if len(gaps) <= SMALL:  # a small cohort: Python's counting beats np.unique's array work
            counted = sorted(Counter(np.asarray(gaps).tolist()).items())
        else:
            counted = zip(*np.unique(gaps, return_counts=True))
        for gap, count in counted:  # in increasing gap order either way
            for hist in (self.window, self.total):
                hist[int(gap)] = hist.get(int(gap), 0) + int(count)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain values and a tensor: loadable with weights_only)."""
        return {"last": torch.from_numpy(self.last.copy()), "last_round": self.last_round,
                "window": dict(self.window), "total": dict(self.total)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.last = state["last"].numpy().astype(np.int64)
        self.last_round = int(state["last_round"])
        self.window = {int(k): int(v) for k, v in state["window"].items()}
        self.total = {int(k): int(v) for k, v in state["total"].items()}

    def age(self, cid: int, server_round: int) -> float:
        """Rounds since ``cid`` last participated (NaN if never): the age of its memory."""
        last = int(self.last[cid])
        return math.nan if last < 0 else float(server_round - last)

    @property
    def clients_seen(self) -> int:
        return int((self.last >= 0).sum())

    def take_window(self) -> dict[str, float]:
        """The window's summary (see :func:`staleness_stats`), and a new empty window."""
        stats, self.window = staleness_stats(self.window), {}
        return stats

    def run_stats(self) -> dict[str, float]:
        return staleness_stats(self.total)


def staleness_stats(hist: dict[int, int]) -> dict[str, float]:
    """``mean``, ``p50``, ``p90``, ``max`` of the gaps of returning participations, the ``first``
    participations' fraction of all, and the ``participations`` counted. Percentiles are of the
    empirical distribution (the smallest gap with at least that share of returns at or below it)."""
    returns = sorted((g, c) for g, c in hist.items() if g > 0)
    total = sum(hist.values())
    if not total:
        return {}
    out = {"participations": float(total), "first": hist.get(0, 0) / total}
    if returns:
        gaps = np.array([g for g, _ in returns], dtype=float)
        counts = np.array([c for _, c in returns], dtype=float)
        cdf = np.cumsum(counts) / counts.sum()
        out.update(mean=float((gaps * counts).sum() / counts.sum()),
                   p50=float(gaps[np.searchsorted(cdf, 0.5 - 1e-12)]),
                   p90=float(gaps[np.searchsorted(cdf, 0.9 - 1e-12)]),
                   max=float(gaps[-1]))
    return out
