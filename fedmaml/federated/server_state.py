"""A run's server state after a round: what the rest of the run depends on, typed.

:class:`~fedmaml.federated.strategy.MetaStrategy` exports and imports it (``export_state`` /
``import_state``); a batch of runs (fedmaml/engines/run_batch.py) builds each run's from its
tensors; the run ledger (fedmaml/federated/run_ledger.py) writes it into the run's checkpoint and
hands it back on resume. :meth:`ServerState.to_checkpoint` keeps the key names checkpoints have
always had, so a checkpoint written before this type existed still resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmaml.core.params import Params


@dataclass
class ServerState:
    w: Params
    #: the model before the last applied update (the result when ``w`` itself diverged)
    w_before_update: Params
    optimizer_state: dict[str, Any]
    optimizer_steps: int
    #: clients that sent a valid update / were sent a train instruction (may hold a memory)
    trained: list[int]
    touched: list[int]
    #: the running totals of the metrics rows (samples, bytes_up, bytes_down)
    totals: dict[str, int]
    #: the states of the participation staleness, the Lambda-pattern selector and the privacy
    #: account, each in its own object's format
    staleness: dict[str, Any] = field(default_factory=dict)
    selector: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's ``strategy`` entry (fedmaml/federated/checkpoint.py)."""
        return {"w": dict(self.w), "w_before_update": dict(self.w_before_update),
                "optimizer": {"state": dict(self.optimizer_state), "steps": self.optimizer_steps},
                "trained": sorted(self.trained), "touched": sorted(self.touched),
                "selector": self.selector, "totals": dict(self.totals),
                "staleness": self.staleness, "privacy": self.privacy}

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> "ServerState":
        return cls(w=dict(state["w"]), w_before_update=dict(state["w_before_update"]),
                   optimizer_state=dict(state["optimizer"]["state"]),
                   optimizer_steps=int(state["optimizer"]["steps"]),
                   trained=sorted(state["trained"]), touched=sorted(state["touched"]),
                   totals=dict(state["totals"]), staleness=state["staleness"],
                   selector=state["selector"], privacy=state["privacy"])
