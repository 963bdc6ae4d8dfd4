"""The number a tuner ranks trials by: a key of a run's evaluation rows, optionally over a subset of
the evaluated clients (docs/tuning.md, "What the metric is measured on").

``unseen.loss.mean`` is the key as ``metrics.jsonl`` writes it; ``unseen.loss@5-24`` is the plain
mean of ``unseen.loss.clients`` over the clients whose ids are 5..24 (``unseen.ids``), which is how a
validation set is carved out of evaluated clients that also hold the test clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmaml.errors import ConfigError
from fedmaml.sweep_spec import parse_seeds

DIRECTIONS = ("min", "max")
GROUPS = ("seen", "unseen")


@dataclass(frozen=True)
class Metric:
    """``key`` in the ``eval`` part of metrics rows; ``clients``: ids to average over (then ``key``
    is ``group.metric`` and the values come from ``group.metric.clients``)."""

    key: str
    direction: str
    clients: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """Every client id written out: the form the tuning manifest keeps (tune.json)."""
        if not self.clients:
            return self.key
        return f"{self.key}@{','.join(map(str, self.clients))}"

    @property
    def label(self) -> str:
        """The metric as a user writes it (``unseen.loss@30-49``), for reports and figure axes,
        where twenty ids written out would not fit."""
        return f"{self.key}@{ids_text(self.clients)}" if self.clients else self.key

    def value(self, evaluation: dict[str, Any]) -> float | None:
        """The metric in one evaluation (``row["eval"]``); None when the row does not hold it, NaN
        when it holds no number (metrics.jsonl writes NaN as null: a diverged run, a client
        without a memory) or when a chosen client's evaluation failed that round."""
        if not self.clients:
            if self.key not in evaluation:
                return None
            return _number(evaluation[self.key])
        group = self.key.split(".")[0]
        ids, values = evaluation.get(f"{group}.ids"), evaluation.get(f"{self.key}.clients")
        if ids is None or values is None:
            return None
        by_id = dict(zip(ids, values))
        missing = [c for c in self.clients if c not in by_id]
        if missing and not evaluation.get("eval-failures"):  # not a failure: a wrong subset
            raise ConfigError(f"--metric {self.text}: client {missing[0]} is not among the "
                              f"evaluated {group} clients ({_ids_text(ids)}); see data."
                              f"{'unseen_clients' if group == 'unseen' else 'num_clients'} and "
                              "federated.eval_clients")
        picked = [_number(by_id.get(c)) for c in self.clients]  # a failed evaluation: NaN
        return sum(picked) / len(picked)

    def curve(self, run_dir: str | Path, until: int | None = None) -> list[tuple[int, float]]:
        """``[(round, value)]`` of every evaluation of the run (up to round ``until``)."""
        from fedmaml.results.run_files import read_metrics

        out = []
        for row in read_metrics(Path(run_dir)):
            ev = row.get("eval")
            if not isinstance(ev, dict) or (until is not None and row["round"] > until):
                continue
            v = self.value(ev)
            if v is not None:
                out.append((int(row["round"]), v))
        return out

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` strictly better than ``b``? (NaN is never better.)"""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a < b if self.direction == "min" else a > b)

    def sort_key(self, v: float) -> float:
        """Ascending order is best first; NaN last."""
        if math.isnan(v):
            return math.inf
        return v if self.direction == "min" else -v


def _number(v: Any) -> float:
    """A metric value as read from metrics.jsonl (null: NaN)."""
    return math.nan if v is None else float(v)


def ids_text(ids: tuple[int, ...] | list[int]) -> str:
    """Ids as ``--seeds`` and ``KEY@IDS`` read them: runs of 3 or more consecutive ids as ``a-b``
    (``30-49,52``); ``parse_seeds`` of the text gives the ids back."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts += [f"{ids[i]}-{ids[j]}"] if j - i >= 2 else [str(x) for x in ids[i:j + 1]]
        i = j + 1
    return ",".join(parts)


def _ids_text(ids: list[int]) -> str:
    return f"ids {ids[0]}..{ids[-1]}" if ids else "none"


def parse_metric(text: str, direction: str = "auto") -> Metric:
    """``unseen.loss.mean`` or ``unseen.loss@5-24`` (clients as seeds are written: ``5-24``,
    ``1,3``); ``direction`` min, max or auto (max for accuracies, min otherwise)."""
    key, at, clients_text = text.partition("@")
    key = key.strip()
    if not key or key.startswith(".") or key.endswith(".") or " " in key:
        raise ConfigError(f"--metric {text!r}: expected an evaluation key such as "
                          "unseen.loss.mean or seen.accuracy.mean, optionally @CLIENTS "
                          "(unseen.loss@5-24)")
    clients: tuple[int, ...] = ()
    if at:
        if key.split(".")[0] not in GROUPS or len(key.split(".")) != 2:
            raise ConfigError(f"--metric {text!r}: a client subset needs GROUP.METRIC before the @ "
                              f"(GROUP one of {', '.join(GROUPS)}), e.g. unseen.loss@5-24")
        clients = parse_seeds(clients_text.strip(), f"--metric {text!r}: the clients")
    if direction == "auto":
        direction = "max" if "acc" in key.split(".")[1 if "." in key else 0] else "min"
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction {direction!r}: allowed: min, max, auto")
    return Metric(key, direction, clients)
