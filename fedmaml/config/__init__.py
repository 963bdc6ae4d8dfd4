"""The typed configuration: its schema, validation, YAML files, dotted key paths and reference docs.

One module per job, each importing only the ones below it (pyproject.toml's ``config-modules``
import-linter contract checks it; docs/architecture.md draws it):

- ``reference`` (docs/configuration.md from the schema) | ``yaml_io`` (YAML files)
- ``paths``: ``key.path=value`` overrides, Flower's flat run config, replacing and naming keys
- ``validate``: a nested dict -> a :class:`Config` (every problem reported together) and back
- ``rules``: the rules linking several keys
- ``values``: one key's value checked against its type, choices and range (the one list parser)
- ``schema``: the section dataclasses, :class:`Config` and the :class:`FieldSpec` of every key

This package re-exports the public names, so ``from fedmaml.config import load_config`` keeps
working; code inside fedmaml may import the precise module.
"""

from fedmaml.config.paths import (apply_overrides, config_from_flat, config_to_flat, parse_override,
                                  replace_path, replace_paths, resolve_key, short_key,
                                  with_entries)
from fedmaml.config.reference import config_reference_markdown
from fedmaml.config.rules import CROSS_FIELD_RULES, cross_field_problems
from fedmaml.config.schema import (ALGORITHM_NAMES, CLIPPING_MODES, DATA_FAMILIES, IMAGE_FAMILIES,
                                   PARTICIPATION_MODELS, PATTERN_TARGETS, SPEED_MODELS,
                                   SWEEP_SECTION, TRACKING_BACKENDS, AlgorithmConfig, Config,
                                   DataConfig, EngineConfig, EvaluationConfig, FaultsConfig,
                                   FederatedConfig, FieldSpec, ModelConfig, ParticipationConfig,
                                   PatternSelectionConfig, PrivacyConfig, Scalar, TrackingConfig,
                                   schema, sections)
from fedmaml.config.validate import config_from_dict, config_to_dict
from fedmaml.config.values import check_value
from fedmaml.config.yaml_io import YamlInt, dump_yaml, load_config, load_config_and_sweep
from fedmaml.errors import ConfigError

__all__ = [
    "ALGORITHM_NAMES", "CLIPPING_MODES", "CROSS_FIELD_RULES", "DATA_FAMILIES", "IMAGE_FAMILIES",
    "PARTICIPATION_MODELS", "PATTERN_TARGETS", "SPEED_MODELS", "SWEEP_SECTION", "TRACKING_BACKENDS",
    "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "EngineConfig", "EvaluationConfig",
    "FaultsConfig", "FederatedConfig", "FieldSpec", "ModelConfig", "ParticipationConfig",
    "PatternSelectionConfig", "PrivacyConfig", "Scalar", "TrackingConfig", "YamlInt",
    "apply_overrides", "check_value", "config_from_dict", "config_from_flat",
    "config_reference_markdown", "config_to_dict", "config_to_flat", "cross_field_problems",
    "dump_yaml", "load_config", "load_config_and_sweep", "parse_override", "replace_path",
    "replace_paths", "resolve_key", "schema", "sections", "short_key", "with_entries",
]
