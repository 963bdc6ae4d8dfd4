"""Differential privacy of the meta-updates on the server: the mean update and the privacy budget.

:class:`UpdatePrivacy` is the one place where :class:`~fedmaml.federated.strategy.MetaStrategy`
turns a round's stacked updates into the mean it applies: the plain (weighted or uniform) mean
without DP, or the clipped, noisy mean of :func:`fedmaml.core.privacy.private_mean` with it. It
also keeps the run's privacy account with Flower's own RDP accountant
(``flwr.supercore.privacy_accounting.RdpAccountant``, a wrapper of Google's ``dp-accounting``, the
optional extra ``fedmaml[dp]``): one Gaussian release per round whose update was applied.

Why not Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrappers: they wrap a
strategy's ``aggregate_train`` and clip ``reply - sent weights`` (a reply is a full model there;
fedmaml's replies are updates already), noise the aggregated *model* (fedmaml noises the mean update,
before momentum or Adam), and their accounting accepts only FedAvg with no sampling amplification.
Their formulas are the ones used here (FlatClip, std = z * C / k).

Accounting model: client-level DP. Cross-silo (every client every round) composes plain Gaussian
releases (no amplification, add-or-remove-one neighbours); cross-device (k of n clients drawn
without replacement each round) composes sampled-without-replacement Gaussian releases
(replace-one neighbours), the pairings Flower's accountant supports.
"""

from __future__ import annotations

import logging
from typing import Any

from fedmaml.core.params import Params
from fedmaml.core.privacy import noise_generator, noise_std, private_mean
from fedmaml.core.server import aggregate_stacked

log = logging.getLogger("fedmaml")


class UpdatePrivacy:
    """The mean update of a round, private or not, and the run's privacy account."""

    def __init__(self, cfg: Any, num_clients: int, clients_per_round: int) -> None:
        self.cfg = cfg
        self.dp = cfg.privacy
        self.enabled = self.dp.clipping != "none"
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.releases = 0
        self.max_norm = 0.0  # largest update norm seen before clipping
        self.clipped = 0  # updates that were scaled down
        self.sampled: list[int] = []  # clients asked in each release (the account's events)
        self._accountant = None
        if self.enabled and self.dp.noise_multiplier > 0:
            self._accountant = make_accountant(self.dp.delta, num_clients, clients_per_round)

    def mean_update(self, server_round: int, stacked: Params, counts: list[int],
                    num_sampled: int) -> Params:
        """The update the server optimizer applies; ``num_sampled``: clients asked this round."""
        if not self.enabled:
            return aggregate_stacked(stacked, counts, self.cfg.federated.aggregation)
        mean, norms = private_mean(stacked, self.dp.clipping_norm, self.dp.noise_multiplier,
                                   num_sampled, noise_generator(self.cfg.seed, server_round))
        self.max_norm = max(self.max_norm, float(norms.max()))
        # Updates clipped on their device arrive within float32 rounding of the bound.
        self.clipped += int((norms > self.dp.clipping_norm * (1 + 1e-5)).sum())
        self._release(num_sampled)
        return mean

    def _release(self, num_sampled: int) -> None:
        if self._accountant is not None:
            self._accountant.compose(gaussian_event(self.dp.noise_multiplier, num_sampled,
                                                    self.num_clients))
        self.sampled.append(num_sampled)
        self.releases += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the releases so far (the account is rebuilt from them)."""
        return {"sampled": list(self.sampled), "max_norm": self.max_norm, "clipped": self.clipped}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.enabled and self.dp.noise_multiplier > 0:
            self._accountant = make_accountant(self.dp.delta, self.num_clients,
                                               self.clients_per_round)
        self.releases, self.sampled = 0, []
        for num_sampled in state["sampled"]:
            self._release(int(num_sampled))
        self.max_norm, self.clipped = float(state["max_norm"]), int(state["clipped"])

    def summary(self) -> dict[str, Any] | None:
        """What summary.json records under ``privacy`` (None without DP)."""
        if not self.enabled:
            return None
        out: dict[str, Any] = {
            "clipping": self.dp.clipping, "clipping_norm": self.dp.clipping_norm,
            "noise_multiplier": self.dp.noise_multiplier,
            "noise_std": noise_std(self.dp.noise_multiplier, self.dp.clipping_norm,
                                   self.clients_per_round),
            "releases": self.releases, "updates_clipped": self.clipped,
            "max_update_norm": self.max_norm,
            "sampling": sampling_method(self.num_clients, self.clients_per_round),
            "clients_per_round": self.clients_per_round, "population": self.num_clients,
            "delta": self.dp.delta,
        }
        if self._accountant is None:  # clipping without noise bounds influence, no DP guarantee
            out["epsilon"] = None
        else:
            spent = self._accountant.get_privacy_spent()
            out.update(epsilon=spent.epsilon, rdp_order=spent.optimal_order,
                       accounting=spent.accounting_method)
        return out


def sampling_method(num_clients: int, clients_per_round: int) -> str:
    return "no-amplification" if clients_per_round >= num_clients else "without-replacement"


def make_accountant(delta: float, num_clients: int, clients_per_round: int):
    """Flower's RDP accountant for this federation's sampling (see the module docstring)."""
    try:
        from flwr.supercore.privacy_accounting import (NeighboringRelation, PrivacyConfig,
                                                       SamplingMethod)
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
        import dp_accounting  # noqa: F401  (Flower loads it lazily; fail here, clearly)
    except ImportError:
        raise ImportError("privacy.noise_multiplier > 0 needs the privacy accountant: "
                          "pip install 'fedmaml[dp]' (dp-accounting)") from None
    if clients_per_round >= num_clients:
        method, relation = SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        method, relation = SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_clients,
                                       neighboring_relation=relation, sampling_method=method))


def gaussian_event(noise_multiplier: float, sample_size: int, population: int):
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier,
                                sample_size=min(sample_size, population),
                                population_size=population)


def epsilon_after(rounds: int, noise_multiplier: float, num_clients: int, clients_per_round: int,
                  delta: float) -> float:
    """The epsilon a run of ``rounds`` applied rounds spends (for planning, and the tests)."""
    acc = make_accountant(delta, num_clients, clients_per_round)
    acc.compose(gaussian_event(noise_multiplier, clients_per_round, num_clients), rounds)
    return acc.get_privacy_spent().epsilon
