"""The model interface the core computes with: a sequence of stages, one per layer group.

A :class:`StagedModel` is a sequence of stages ``h_l = stage_l(params_l, h_{l-1})``. Each stage owns
exactly one *layer group*, so a Lambda pattern's columns are the stages, and the output of a frozen
prefix of stages is a natural cache point for restricted adaptation (fedmaml/core/adaptation.py).

It lives in the core, not in fedmaml/models/, because every piece of the core math (adaptation,
estimators, memory, evaluation) computes through it: the core is the bottom layer and imports only
torch (docs/architecture.md). The concrete stages (linear, convolution blocks, a wrapped
``nn.Module``) and the built-in models are in fedmaml/models/.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from fedmaml.core.params import Params


class Stage(Protocol):
    """One layer group: its parameters' initialiser and its pure forward function."""

    name: str

    def init(self, generator: torch.Generator) -> dict[str, Tensor]: ...

    def __call__(self, p: dict[str, Tensor], h: Tensor) -> Tensor: ...


class StagedModel:
    """An ordered sequence of stages; the stages are the model's layer groups, input side first."""

    def __init__(self, name: str, stages: Sequence[Stage]) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.name = name
        self.stages = tuple(stages)
        self.group_names: tuple[str, ...] = tuple(names)
        self._local_keys: list[tuple[tuple[str, str], ...]] = []
        probe = self.init(0)
        for s in self.stages:
            self._local_keys.append(tuple((k.split(".", 1)[1], k) for k in probe
                                          if k.split(".", 1)[0] == s.name))
        #: Full parameter names of each group, in group order.
        self.group_params: tuple[tuple[str, ...], ...] = tuple(
            tuple(full for _, full in keys) for keys in self._local_keys)

    @property
    def num_groups(self) -> int:
        return len(self.stages)

    def init(self, seed: int) -> Params:
        """Fresh parameters, a deterministic function of ``seed``."""
        g = torch.Generator().manual_seed(seed)
        params: Params = {}
        for s in self.stages:
            for k, v in s.init(g).items():
                params[f"{s.name}.{k}"] = v
        return params

    def names_of(self, groups: Sequence[int]) -> list[str]:
        """Parameter names of the given group indices."""
        return [n for g in groups for n in self.group_params[g]]

    def forward(self, params: Params, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run stages ``start .. stop - 1`` on ``x`` (the whole model by default)."""
        h = x
        for i in range(start, self.num_groups if stop is None else stop):
            h = self.stages[i]({local: params[full] for local, full in self._local_keys[i]}, h)
        return h

    __call__ = forward

    def describe(self) -> str:
        return f"{self.name} with layer groups {list(self.group_names)}"
