"""The Lambda patterns a config names, resolved against its model's layer groups; and those groups
where the config alone gives them.

A run resolves ``algorithm.inner_pattern``, ``algorithm.memory_pattern`` and ``evaluation.pattern``
when it sets up (fedmaml/federated/setup.py), against the model it built. A sweep checks the
patterns of every run the same way before any run starts (fedmaml/sweep.py), in the process that
plans it, which stays light: the layer groups of the built-in models and the groups a user's module
declares (``model.groups``) follow from the config, without torch (tests/test_sweep.py keeps them
equal to the built models'). Only a user's module without ``model.groups`` must be built to know
its groups (:func:`fedmaml.federated.setup.built_layer_groups`).
"""

from __future__ import annotations

from typing import NamedTuple

from fedmaml.config.schema import Config, ModelConfig
from fedmaml.core.patterns import Pattern, resolve_pattern
from fedmaml.errors import PatternError
from fedmaml.user_objects import is_user_object, parse_mapping

#: The layer groups of conv4 (fedmaml/models/conv4.py): four blocks, then the head.
CONV4_GROUPS = ("conv1", "conv2", "conv3", "conv4", "head")


class LayerGroups(NamedTuple):
    names: tuple[str, ...]  # input side first: a pattern's columns
    model: str  # how pattern errors name the model


class ConfigPatterns(NamedTuple):
    inner: Pattern
    memory: Pattern
    evaluation: Pattern


def declared_layer_groups(model: ModelConfig) -> LayerGroups | None:
    """The layer groups of ``model`` (the config's ``model`` section) as its config gives them; None
    for a user's module without ``model.groups`` (its groups are its built children's)."""
    if is_user_object(model.name):
        groups = parse_mapping("model.groups", model.groups)
        return LayerGroups(tuple(groups), model.name) if groups else None
    if model.name == "linear":
        return LayerGroups(("layer1",), "the linear model")
    if model.name == "conv4":
        return LayerGroups(CONV4_GROUPS, "conv4")
    # mlp: layer1 .. layerN, one per Linear layer (flatten and the ReLUs own no parameters)
    return LayerGroups(tuple(f"layer{i + 1}" for i in range(len(model.hidden) + 1)),
                       f"the mlp of model.hidden {list(model.hidden)}")


def resolve_config_pattern(key: str, text: str, steps: int, groups: LayerGroups) -> Pattern:
    """Config key ``key``'s pattern ``text`` for a model's layer groups; an error names the key."""
    try:
        return resolve_pattern(text, groups.names, steps, groups.model)
    except PatternError as e:
        raise PatternError(f"{key}: {e}") from None


def config_patterns(cfg: Config, groups: LayerGroups) -> ConfigPatterns:
    """Every pattern of a run's config resolved for its model's layer groups (the first that does
    not fit them is a PatternError naming its key)."""
    a, ev = cfg.algorithm, cfg.evaluation
    inner = resolve_config_pattern("algorithm.inner_pattern", a.inner_pattern, a.inner_steps,
                                   groups)
    memory = (resolve_config_pattern("algorithm.memory_pattern", a.memory_pattern, a.inner_steps,
                                     groups) if a.memory_pattern else inner)
    evaluation = resolve_config_pattern("evaluation.pattern", ev.pattern, ev.steps, groups)
    return ConfigPatterns(inner, memory, evaluation)
