"""Everything a run derives from its config, built once per process and shared by the apps.

Both sides of a federation (the ServerApp and every ClientApp, possibly in different processes or on
different machines) call :func:`setup_for` with the same config and so agree on the model, the data
partition of each client id, the algorithm's hyperparameters and the initial parameters.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch

from fedmaml.algorithms import Algorithm, Hyper, get_algorithm, has_server_rule
from fedmaml.config.schema import Config
from fedmaml.core.estimators import Estimator
from fedmaml.core.losses import LossFn, loss_named
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern, is_alias
from fedmaml.core.task_step import StepConfig
from fedmaml.data import build_federation
from fedmaml.data.spec import USER_FAMILIES
from fedmaml.data.tasks import Federation
from fedmaml.data.user import check_client_sizes
from fedmaml.errors import ConfigError
from fedmaml.federated.config_patterns import ConfigPatterns, LayerGroups, config_patterns
from fedmaml.federated.privacy import is_private
from fedmaml.models import Model, build_model
from fedmaml.results.wording import counted

log = logging.getLogger("fedmaml")


@dataclass(frozen=True)
class ExperimentSetup:
    config: Config
    federation: Federation
    model: Model
    loss_fn: LossFn
    algorithm: Algorithm
    hyper: Hyper
    eval_pattern: Pattern
    eval_alpha: float
    initial_params: Params

    @property
    def classification(self) -> bool:
        return self.federation.task_type == "classification"

    def eta_for_round(self, server_round: int) -> float:
        """The local step size of a round: ``eta``, divided by ``lr_decay_factor`` after the decay point."""
        fed, eta = self.config.federated, self.config.algorithm.eta
        if fed.lr_decay_at > 0 and server_round > fed.lr_decay_at * fed.rounds:
            return eta / fed.lr_decay_factor
        return eta


def layer_groups(model: Model) -> LayerGroups:
    """A built model's layer groups, for resolving a config's patterns against them."""
    return LayerGroups(tuple(model.group_names), model.name)


def built_layer_groups(cfg: Config) -> LayerGroups:
    """The layer groups of ``cfg``'s model as a run builds it: with its data's shapes (a user's
    module may need them). For checking a config's patterns where the config alone does not give
    the groups (:func:`fedmaml.federated.config_patterns.declared_layer_groups`)."""
    federation = build_federation(cfg.data, cfg.seed)
    return layer_groups(build_model(cfg.model, federation.input_shape, federation.num_outputs,
                                    data=f"data.family={cfg.data.family}"))


def pattern_step_warnings(cfg: Config) -> list[str]:
    """One line per written-out pattern whose step count differs from its steps key, which then
    does not apply (the aliases alone take their step count from it): the pattern's key and text,
    the steps it runs, the steps key and its value. Empty when every pattern runs what its steps
    key says."""
    a, ev = cfg.algorithm, cfg.evaluation
    keys = [("algorithm.inner_pattern", a.inner_pattern, "algorithm.inner_steps", a.inner_steps),
            *([("algorithm.memory_pattern", a.memory_pattern, "algorithm.inner_steps",
                a.inner_steps)] if a.memory_pattern else []),
            ("evaluation.pattern", ev.pattern, "evaluation.steps", ev.steps)]
    out = []
    for key, text, steps_key, steps in keys:
        if is_alias(text) or text.strip() == "none":  # none: no adaptation, by choice
            continue
        pattern = Pattern.parse(text)
        if pattern.steps == steps:
            continue
        rows = set(pattern.rows)
        wanted = ("'none'" if steps == 0 else
                  f"'{''.join(map(str, pattern.rows[0]))}x{steps}'" if len(rows) == 1
                  else f"rows for {adaptation_steps(steps)}")
        out.append(f"{key}: '{text.strip()}' is written out and runs "
                   f"{adaptation_steps(pattern.steps)}; {steps_key} = {steps} applies only to the "
                   f"aliases (full, head, body). For {adaptation_steps(steps)} write {wanted} (or "
                   f"an alias); to say what runs, set {steps_key}: {pattern.steps}")
    return out


def adaptation_steps(n: int) -> str:
    """``1 adaptation step``, ``5 adaptation steps``."""
    return counted(n, "adaptation step")


def warn_pattern_steps(cfgs: Config | list[Config]) -> None:
    """Log :func:`pattern_step_warnings` as the server sets up runs (``cfgs``: one, or a batch's,
    each line once)."""
    lines = [w for c in ([cfgs] if isinstance(cfgs, Config) else cfgs)
             for w in pattern_step_warnings(c)]
    for line in dict.fromkeys(lines):
        log.warning("%s", line)


def build_hyper(cfg: Config, patterns: ConfigPatterns, algorithm: Algorithm) -> Hyper:
    """The algorithm's hyperparameters; ``patterns``: the config's, resolved for its model."""
    a = cfg.algorithm
    # Algorithms without memory are MOML with beta = 1: the "memory" is A(w; S) itself.
    beta = a.beta if algorithm.uses_memory else 1.0
    # algorithm.meta_gradient's choices are the estimators (StepConfig checks it again)
    step = StepConfig(alpha=a.alpha, beta=beta, estimator=cast(Estimator, a.meta_gradient),
                      inner_pattern=patterns.inner, memory_pattern=patterns.memory,
                      hf_delta=a.hf_delta, hf_perturbation=a.hf_perturbation,
                      scale_by_beta=a.scale_by_beta, loss_before=a.loss_before)
    k = a.support_size
    return Hyper(step=step, eta=a.eta, local_steps=a.local_steps, tasks_per_step=a.tasks_per_step,
                 support_size=k, query_size=a.query_size or k,
                 init_support_size=a.init_support_size or k, memory_policy=a.memory_policy,
                 memory_init=a.memory_init)


def _cache_key(cfg: Config) -> str:
    from fedmaml.config import config_to_dict

    d = config_to_dict(cfg)
    # Only what changes the built objects matters (not e.g. output paths or engine choice).
    keep = {k: d[k] for k in ("seed", "data", "model", "algorithm", "evaluation", "federated")}
    return json.dumps(keep, sort_keys=True)


# Apps call this once per message: look the config object up by value first (a hash and an
# identity check, ~2 us) before serialising it into the key that ignores unrelated fields.
@functools.lru_cache(maxsize=8)
def setup_for(cfg: Config) -> ExperimentSetup:
    """The (cached) setup of a config."""
    return _setup_cached(_cache_key(cfg), cfg)


@functools.lru_cache(maxsize=8)
def _setup_cached(_key: str, cfg: Config) -> ExperimentSetup:
    federation = build_federation(cfg.data, cfg.seed)
    model = build_model(cfg.model, federation.input_shape, federation.num_outputs,
                        data=f"data.family={cfg.data.family}")
    algorithm = get_algorithm(cfg.algorithm.name, cfg.algorithm.kwargs)
    if has_server_rule(algorithm) and is_private(cfg.privacy):
        # the privacy guarantee is of the clipped, noised mean: another rule voids it
        raise ConfigError(f"algorithm.name: {cfg.algorithm.name} has its own server rule "
                          "(server_update), which differential privacy cannot account for; set "
                          "privacy.clipping: none and privacy.noise_multiplier: 0, or drop "
                          "server_update to use the mean")
    patterns = config_patterns(cfg, layer_groups(model))  # once: the first bad one names its key
    hyper = build_hyper(cfg, patterns, algorithm)
    if cfg.data.family in USER_FAMILIES:  # a user's clients may be too small for a step
        check_client_sizes(federation, hyper.support_size + hyper.query_size,
                           "algorithm.support_size + query_size", f"data.family = {cfg.data.family!r}")
    return ExperimentSetup(
        config=cfg, federation=federation, model=model, loss_fn=loss_named(cfg.model.loss, federation.task_type),
        algorithm=algorithm, hyper=hyper, eval_pattern=patterns.evaluation,
        eval_alpha=cfg.evaluation.alpha or cfg.algorithm.alpha, initial_params=model.init(cfg.seed if cfg.model.init_seed < 0 else cfg.model.init_seed))


def resolve_device(name: str) -> torch.device:
    """``engine.device``: ``cpu``, ``cuda`` (an error without a GPU) or ``auto`` (cuda when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device: 'cuda' is not available on this machine ({_no_gpu()}); "
                          "available here: cpu. Use 'cpu', or 'auto' (cuda where present)")
    return torch.device(name)


def use_torch_threads(engine: Any) -> None:
    """``engine.torch_threads`` for this process's torch (0: torch's own number, left as it is)."""
    if engine.torch_threads and torch.get_num_threads() != engine.torch_threads:
        torch.set_num_threads(engine.torch_threads)


def check_device(engine: Any) -> None:
    """Refuse, before any engine starts, an ``engine.device`` (or Ray ``engine.num_gpus``) its
    clients cannot have, with the same error on every engine. Clients run on this machine, except
    on a Ray cluster named by ``engine.ray_address``, whose machines may have a GPU this one lacks:
    there a client without it fails its replies, and a run whose rounds all fail ends ``failed``
    (health.py)."""
    if engine.name in ("ray", "sharded") and engine.ray_address not in ("", "local"):
        return
    resolve_device(engine.device)
    if engine.name in ("ray", "sharded") and engine.num_gpus > 0 and not torch.cuda.is_available():
        # Flower would start Ray, find room for no actor and stop ("ActorPool is empty")
        raise ConfigError(f"engine.num_gpus: {engine.num_gpus:g} gives each client a share of a "
                          f"GPU, but there is none on this machine ({_no_gpu()}); available here: "
                          "0 GPUs. Use engine.num_gpus: 0, or engine.ray_address of a Ray cluster "
                          "with GPUs")


def _no_gpu() -> str:
    """Why torch finds no GPU here, for the messages above."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"
