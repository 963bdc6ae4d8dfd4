"""Differential privacy of the meta-updates on the server: the mean update and the privacy budget.

:class:`UpdatePrivacy` is where a private run's server round
(:func:`~fedmaml.federated.server_round.aggregate_round`, for a run alone and for each run of a
batch) turns the round's stacked updates into the clipped, noisy mean of
:func:`fedmaml.core.privacy.private_mean` it applies, with the run's own noise stream. It also
keeps the run's privacy account: one Gaussian release per round whose update was applied.

**What is protected** (docs/privacy.md): user-level DP, one client's whole data (all its tasks)
against the released sequence of models. The neighbouring relation and the sensitivity follow from
the client-sampling scheme (:class:`~fedmaml.federated.participation.ClientSampling`); the released
mean is ``(sum of the clipped updates that arrived + N(0, z^2 C^2 I)) / d`` with a denominator ``d``
that is a constant of the configuration, never the number of replies:

* ``all`` (cross-silo): add/remove-one, ``d = n`` (the configured number of silos). Adding or
  removing one silo adds or removes one term of norm <= C: the sum's sensitivity is ``C``, and the
  release is a Gaussian mechanism with noise multiplier ``z``.
* ``fixed`` (``k`` of ``n`` without replacement): replace-one (a fixed-size sample from a fixed
  population is only defined when the population's size is public), ``d = k``. Replacing one
  client's data swaps one term for another, both of norm <= C: the sum's sensitivity is ``2C``, so
  relative to it the noise multiplier is ``z / 2``. Accounted as sampled-without-replacement
  Gaussian releases (Wang, Balle, Kasiviswanathan 2019), capped order by order by the unsampled
  Gaussian mechanism (subsampling never costs privacy; their bound alone exceeds it near k = n).
* ``poisson`` (each client with probability ``q``): add/remove-one, ``d = q n`` (the expected cohort
  size), sensitivity ``C``: the DP-FedAvg setting (McMahan et al. 2018), accounted as
  Poisson-subsampled Gaussian releases with noise multiplier ``z``. A private Poisson round releases
  its noisy mean even when nobody was sampled or replied: the account assumes a release every round.

The account (:class:`PrivacyAccount`) uses Google's ``dp-accounting`` (the optional extra
``fedmaml[dp]``): epsilon is the smaller of its RDP accountant's bound (default orders; the one
accountant that covers all three schemes) and a tighter one where it has the mechanism (the exact
Gaussian mechanism for ``all`` and as a cap for ``fixed``, the PLD accountant for ``poisson``).
tests/test_privacy.py checks it against dp-accounting's RDP and PLD accountants computed
independently, and against published DP-SGD numbers.

Why not Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrappers: they wrap a
strategy's ``aggregate_train`` and clip ``reply - sent weights`` (a reply is a full model there;
fedmaml's replies are updates already), noise the aggregated *model* (fedmaml noises the mean update,
before momentum or Adam), and their accounting accepts only FedAvg with no sampling amplification.
Their formulas are the ones used here (FlatClip, std = z * C / d).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from fedmaml.config.schema import Config, PrivacyConfig
from fedmaml.core.params import Params
from fedmaml.core.privacy import noise_generator, noise_std, private_mean
from fedmaml.federated.participation import ClientSampling

log = logging.getLogger("fedmaml")

#: Per scheme: the neighbouring relation, and the sensitivity of the sum in units of the clipping
#: norm C (see the module docstring).
RELATIONS = {"all": ("add-or-remove-one", 1.0), "fixed": ("replace-one", 2.0),
             "poisson": ("add-or-remove-one", 1.0)}

#: The PLD accountant's discretization of the privacy loss (see :func:`second_bound`).
PLD_INTERVAL = 1e-3


def is_private(dp: PrivacyConfig) -> bool:
    """Whether a run's updates are differentially private, in any form: clipped at the server or
    on the clients (``privacy.clipping``), or noised (``privacy.noise_multiplier``; noise without
    clipping is a config error, fedmaml/config/rules.py, and counts as private all the same)."""
    return dp.clipping != "none" or dp.noise_multiplier > 0


class UpdatePrivacy:
    """The mean update of a round, private or not, and the run's privacy account."""

    def __init__(self, cfg: Config, sampling: ClientSampling) -> None:
        self.cfg = cfg
        self.dp = cfg.privacy
        self.enabled = is_private(self.dp)
        self.sampling = sampling
        self.max_norm = 0.0  # largest update norm seen before clipping
        self.clipped = 0  # updates that were scaled down
        self.sampled: list[int] = []  # clients asked in each release: the account is its length
        self.account: PrivacyAccount | None = None
        if self.enabled and self.dp.noise_multiplier > 0:
            self.account = PrivacyAccount(sampling, self.dp.noise_multiplier)

    @property
    def releases_every_round(self) -> bool:
        """A private Poisson round releases even with no valid reply (the account assumes it)."""
        return self.account is not None and self.sampling.scheme == "poisson"

    def denominator(self, num_sampled: int) -> float:
        """What the clipped sum is divided by: a constant of the configuration (``k``, ``n`` or
        ``q n``), whatever replied; clipping alone under a participation shortfall divides by the
        clients asked (there is no account to keep)."""
        if self.sampling.scheme == "fixed" and self.account is None:
            return float(num_sampled)
        return self.sampling.expected_size

    def mean_update(self, server_round: int, stacked: Params, num_sampled: int) -> Params:
        """The private mean the server optimizer applies; ``num_sampled``: clients asked this
        round. ``stacked`` may hold no row (a private Poisson round that nobody answered: noise
        alone). Without privacy the server round (server_round.py) takes the plain mean itself."""
        if not self.enabled:
            raise ValueError("privacy.clipping is none: there is no private mean to take")
        mean, norms = private_mean(stacked, self.dp.clipping_norm, self.dp.noise_multiplier,
                                   self.denominator(num_sampled),
                                   noise_generator(self.cfg.seed, server_round))
        if len(norms):
            self.max_norm = max(self.max_norm, float(norms.max()))
        # Updates clipped on their device arrive within float32 rounding of the bound.
        self.clipped += int((norms > self.dp.clipping_norm * (1 + 1e-5)).sum())
        self.sampled.append(num_sampled)
        if self.account is not None:
            self.account.compose(1)
        return mean

    @property
    def releases(self) -> int:
        return len(self.sampled)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the releases so far (the account is rebuilt from them)."""
        return {"sampled": list(self.sampled), "max_norm": self.max_norm, "clipped": self.clipped}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sampled = [int(n) for n in state["sampled"]]
        if self.account is not None:  # same mechanism: keep its curve, recount the releases
            self.account.count = len(self.sampled)
        self.max_norm, self.clipped = float(state["max_norm"]), int(state["clipped"])

    def summary(self) -> dict[str, Any] | None:
        """What summary.json records under ``privacy`` (None without DP)."""
        if not self.enabled:
            return None
        s = self.sampling
        relation, factor = RELATIONS[s.scheme]
        denominator = self.denominator(s.size)
        out: dict[str, Any] = {
            "clipping": self.dp.clipping, "clipping_norm": self.dp.clipping_norm,
            "noise_multiplier": self.dp.noise_multiplier,
            "noise_std": noise_std(self.dp.noise_multiplier, self.dp.clipping_norm, denominator),
            "releases": self.releases, "updates_clipped": self.clipped,
            "max_update_norm": self.max_norm,
            "sampling": s.scheme, "sampling_rate": s.rate, "denominator": denominator,
            "clients_per_round": s.size, "population": s.population,
            "relation": relation, "sensitivity": factor * self.dp.clipping_norm,
            "delta": self.dp.delta,
        }
        if self.account is None:  # clipping without noise bounds influence, no DP guarantee
            out["epsilon"] = None
        else:
            out.update(self.account.epsilon(self.dp.delta))
        return out


def _dp_accounting():
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:
        raise ImportError("privacy.noise_multiplier > 0 needs the privacy accountant: "
                          "pip install 'fedmaml[dp]' (dp-accounting)") from None
    return dp_accounting, rdp_privacy_accountant


def release_rdp(sampling: ClientSampling, noise_multiplier: float,
                orders: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(orders, rdp)``: the RDP curve of one round's release under ``sampling`` (module
    docstring), from dp-accounting's RDP accountant. ``orders``: its defaults unless given."""
    dpa, rdp_mod = _dp_accounting()
    event, relation = dpa.dp_event, dpa.NeighboringRelation
    s, z = sampling, noise_multiplier
    if not z > 0:
        raise ValueError(f"noise multiplier must be > 0, got {z}")

    def curve(ev, rel) -> np.ndarray:
        acc = rdp_mod.RdpAccountant(orders, rel)
        # For small fractional orders its series may not converge: it logs a warning per order and
        # gives that order an infinite RDP (never used, so never an understatement). Quiet here.
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            acc.compose(ev)
        finally:
            absl.setLevel(level)
        return acc.rdp

    acc_orders = rdp_mod.RdpAccountant(orders).orders
    if s.scheme == "all":
        return acc_orders, curve(event.GaussianDpEvent(z), relation.ADD_OR_REMOVE_ONE)
    if s.scheme == "poisson":
        return acc_orders, curve(event.PoissonSampledDpEvent(s.rate, event.GaussianDpEvent(z)),
                                 relation.ADD_OR_REMOVE_ONE)
    if s.scheme != "fixed":
        raise ValueError(f"sampling scheme {s.scheme!r} is not one of all, fixed, poisson")
    # Sensitivity 2C: relative to it the noise multiplier is z / 2.
    unsampled = curve(event.GaussianDpEvent(z / 2), relation.REPLACE_ONE)
    if s.size >= s.population:
        return acc_orders, unsampled
    wor = curve(event.SampledWithoutReplacementDpEvent(s.population, s.size,
                                                       event.GaussianDpEvent(z / 2)),
                relation.REPLACE_ONE)
    return acc_orders, np.minimum(wor, unsampled)


def second_bound(sampling: ClientSampling, noise_multiplier: float, releases: int,
                 delta: float) -> tuple[str, float]:
    """``(name, epsilon)``: a second upper bound from dp-accounting, tighter than RDP where it has
    the mechanism. ``all`` and ``fixed``: the unsampled Gaussian mechanism, exactly
    (``gaussian_mechanism.get_epsilon_gaussian``, Balle and Wang 2018; ``T`` releases of noise ``z``
    relative to the sensitivity compose to one of ``z / sqrt(T)``), with sensitivity ``2C`` under
    replace-one; for ``fixed`` it bounds the sampled mechanism (each pair of coupled samples is
    equal or replace-one neighbours), which dp-accounting's PLD accountant cannot model (it has no
    sampled-without-replacement event). ``poisson``: its PLD accountant (pessimistic
    discretization)."""
    dpa, _ = _dp_accounting()
    s, z = sampling, noise_multiplier
    if s.scheme in ("all", "fixed"):
        from dp_accounting import gaussian_mechanism

        factor = RELATIONS[s.scheme][1]
        return "gaussian", float(gaussian_mechanism.get_epsilon_gaussian(
            z / (factor * math.sqrt(releases)), delta))
    from dp_accounting.pld import pld_privacy_accountant

    # A coarser grid than its default 1e-4 (still rounded pessimistically: an upper bound): 10x
    # faster at large epsilons, within 1e-3 of the default's value.
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_INTERVAL)
    acc.compose(dpa.dp_event.PoissonSampledDpEvent(s.rate, dpa.dp_event.GaussianDpEvent(z)),
                releases)
    return "pld", float(acc.get_epsilon(delta))


class PrivacyAccount:
    """The releases of a run, and the epsilon they spend. Every release of a run is the same
    mechanism, so the account is a count, one RDP curve and one PLD event.

    Epsilon is the smaller of two upper bounds from dp-accounting: its RDP accountant (the one that
    covers every scheme) and :func:`second_bound`. Both bound the same mechanism's privacy loss, so
    their minimum does too."""

    def __init__(self, sampling: ClientSampling, noise_multiplier: float,
                 orders: Sequence[float] | None = None) -> None:
        self.sampling, self.noise_multiplier = sampling, noise_multiplier
        self.orders, self.per_release = release_rdp(sampling, noise_multiplier, orders)
        self.count = 0

    def compose(self, count: int = 1) -> None:
        self.count += count

    def epsilon(self, delta: float) -> dict[str, Any]:
        """``epsilon`` (the smaller bound), ``epsilon_rdp`` and ``rdp_order`` (the RDP accountant's
        RDP-to-DP conversion and its optimal order), the second bound (``epsilon_gaussian`` or
        ``epsilon_pld``, :func:`second_bound`) and ``accountant`` (which bound ``epsilon`` is)."""
        if self.count == 0:  # nothing released (rdp_order None: JSON has no NaN)
            return {"epsilon": 0.0, "epsilon_rdp": 0.0, "rdp_order": None, "accountant": "rdp"}
        _, rdp_mod = _dp_accounting()
        rdp, order = map(float, rdp_mod.compute_epsilon(self.orders, self.count * self.per_release,
                                                        delta))
        name, other = second_bound(self.sampling, self.noise_multiplier, self.count, delta)
        return {"epsilon": min(rdp, other), "epsilon_rdp": rdp, "rdp_order": order,
                f"epsilon_{name}": other, "accountant": name if other < rdp else "rdp"}


def epsilon_after(rounds: int, noise_multiplier: float, sampling: ClientSampling,
                  delta: float) -> float:
    """The epsilon a run of ``rounds`` released rounds spends (for planning, and the tests), e.g.
    ``epsilon_after(30, 1.0, client_sampling(cfg.federated, 200), 1e-5)``."""
    account = PrivacyAccount(sampling, noise_multiplier)
    account.compose(rounds)
    return account.epsilon(delta)["epsilon"]
