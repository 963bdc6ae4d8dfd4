"""The rules that involve several keys: one function, one block per rule; each problem is a
``key.path: message`` string. They run only on a config whose fields are individually valid."""

import yaml

from fedmaml.config.schema import (ALGORITHM_NAMES, IMAGE_FAMILIES, IMPORT_PATH, MAPPING_KEYS,
                                   Config)
from fedmaml.config.values import suggest
from fedmaml.user_objects import load_mapping_text

# Meta-gradient estimators each algorithm supports (others accept any; reptile/fedavg ignore it).
_META_GRADIENTS = {
    "per_fedavg": ("first_order", "hessian_free"),
    "fedmeta": ("first_order", "second_order"),
}


#: The rules of :func:`cross_field_problems` in words, for the docs. Keep the two in step.
CROSS_FIELD_RULES = (
    "`algorithm.memory_policy: decay_to_w` requires `federated.mode: cross_silo`.",
    "`algorithm.memory_init: initial_model` does not go with `algorithm.memory_policy: reinit`.",
    "`algorithm.name: per_fedavg` takes `algorithm.meta_gradient` `first_order` or `hessian_free`; "
    "`fedmeta` takes `first_order` or `second_order`.",
    "`federated.clients_per_round` must not exceed `data.num_clients`.",
    "`engine.shards` must not exceed `data.num_clients + data.unseen_clients` (a shard owns the "
    "clients whose id modulo `engine.shards` is its index: more shards own none).",
    "`federated.min_replies` must not exceed `federated.clients_per_round` when that is above 0, "
    "nor `data.num_clients`.",
    "`algorithm.name` is a built-in algorithm or an import path `package.module:Name`; "
    "`algorithm.kwargs` only goes with an import path.",
    "`model.name: mlp` needs at least one `model.hidden` width (`linear` is the model without).",
    "`model.name: conv4` needs an image family (" + ", ".join(f"`{f}`" for f in IMAGE_FAMILIES) + ").",
    "`participation.model` other than `uniform` requires `federated.mode: cross_device`; "
    "`participation.diurnal_mean` plus or minus `participation.diurnal_amplitude` must stay "
    "within [0, 1].",
    "`pattern_selection.at_round` must not exceed `federated.rounds`.",
    "`faults.fail + faults.straggle + faults.dropout` must not exceed 1; `faults.straggle` and "
    "`faults.dropout` need `federated.round_timeout > 0`.",
    "`privacy.clipping` other than `none` requires `federated.aggregation: uniform`; "
    "`privacy.noise_multiplier` above 0 requires `privacy.clipping` other than `none` and "
    "`participation.model: uniform`.",
    "`federated.sampling: poisson` requires `federated.mode: cross_device`; with "
    "`privacy.noise_multiplier` above 0 it requires `federated.min_replies: 1` (a private Poisson "
    "round releases its noisy mean whatever the number of replies).",
)


def cross_field_problems(cfg: Config) -> list[str]:
    """Rules that involve several keys. Runs only on a config whose fields are individually valid."""
    problems = []
    alg, fed, data = cfg.algorithm, cfg.federated, cfg.data

    # MOML-V2's decay needs every task visited every step, which only cross-silo guarantees.
    if alg.memory_policy == "decay_to_w" and fed.mode != "cross_silo":
        problems.append(f"algorithm.memory_policy: 'decay_to_w' requires federated.mode "
                        f"'cross_silo' (got {fed.mode!r}); use 'keep' or 'reinit' in cross-device mode")

    # reinit rebuilds the memory from w_r at every participation: there is no first memory to move.
    if alg.memory_init == "initial_model" and alg.memory_policy == "reinit":
        problems.append("algorithm.memory_init: 'initial_model' does not go with "
                        "algorithm.memory_policy 'reinit' (which rebuilds the memory from the round's "
                        "model at every participation); use 'keep' or memory_init 'current_model'")

    allowed = _META_GRADIENTS.get(alg.name)
    if allowed is not None and alg.meta_gradient not in allowed:
        problems.append(f"algorithm.meta_gradient: {alg.meta_gradient!r} is not available for "
                        f"algorithm {alg.name!r}; allowed: {', '.join(allowed)}")

    if fed.clients_per_round > data.num_clients:
        problems.append(f"federated.clients_per_round: {fed.clients_per_round} exceeds "
                        f"data.num_clients ({data.num_clients})")
    clients = data.num_clients + data.unseen_clients
    if cfg.engine.name == "sharded" and data.num_clients > 0 and cfg.engine.shards > clients:
        problems.append(f"engine.shards: {cfg.engine.shards} exceeds the federation's "
                        f"{clients} clients (data.num_clients + data.unseen_clients); a shard "
                        f"owns the clients whose id modulo engine.shards is its index, so at most "
                        f"{clients} shards have any")
    if fed.clients_per_round > 0 and fed.min_replies > fed.clients_per_round:
        problems.append(f"federated.min_replies: {fed.min_replies} exceeds "
                        f"federated.clients_per_round ({fed.clients_per_round})")
    elif fed.min_replies > data.num_clients:
        problems.append(f"federated.min_replies: {fed.min_replies} exceeds "
                        f"data.num_clients ({data.num_clients})")

    model_names = ("mlp", "conv4", "linear")
    if cfg.model.name not in model_names and not IMPORT_PATH.match(cfg.model.name):
        problems.append(f"model.name: {cfg.model.name!r} is not allowed; allowed: "
                        f"{', '.join(model_names)}, or an import path 'package.module:factory' of "
                        "your own torch.nn.Module" + suggest(cfg.model.name, model_names))
    loss_names = ("auto", "mse", "cross_entropy")
    if cfg.model.loss not in loss_names and not IMPORT_PATH.match(cfg.model.loss):
        problems.append(f"model.loss: {cfg.model.loss!r} is not allowed; allowed: "
                        f"{', '.join(loss_names)}, or an import path 'package.module:function' of "
                        "your own loss" + suggest(cfg.model.loss, loss_names))
    alg_names = ALGORITHM_NAMES
    if alg.name not in alg_names and not IMPORT_PATH.match(alg.name):
        problems.append(f"algorithm.name: {alg.name!r} is not allowed; allowed: "
                        f"{', '.join(alg_names)}, or an import path 'package.module:Name' of your "
                        "own algorithm" + suggest(alg.name, alg_names))
    for key in MAPPING_KEYS:
        section, name = key.split(".")
        text = getattr(getattr(cfg, section), name)
        if text.strip():
            try:
                value = load_mapping_text(text)
            except yaml.YAMLError:
                value = None
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping such as {{name: value}}, got {text!r}")
            elif section == "algorithm" and alg.name in alg_names:
                problems.append(f"{key}: only for your own algorithm (algorithm.name "
                                f"'package.module:Name'); algorithm.name is {alg.name!r}")
            elif section == "model" and cfg.model.name in model_names:
                problems.append(f"{key}: only for your own module (model.name "
                                f"'package.module:factory'); model.name is {cfg.model.name!r}")

    if cfg.model.name == "mlp" and not cfg.model.hidden:
        problems.append("model.hidden: [] leaves the MLP without a hidden layer; give at least one "
                        "width, e.g. [40, 40], or set model.name: linear for a linear model")

    if cfg.model.name == "conv4" and data.family not in IMAGE_FAMILIES:
        problems.append(f"model.name: 'conv4' needs an image family ({', '.join(IMAGE_FAMILIES)}); "
                        f"data.family is {data.family!r}")

    part = cfg.participation
    if part.model != "uniform" and fed.mode != "cross_device":
        problems.append(f"participation.model: {part.model!r} needs federated.mode 'cross_device' "
                        f"(got {fed.mode!r}); cross-silo takes every silo every round")
    if part.model == "diurnal" and not (
            0 <= part.diurnal_mean - part.diurnal_amplitude
            and part.diurnal_mean + part.diurnal_amplitude <= 1):
        problems.append(f"participation.diurnal_amplitude: {part.diurnal_amplitude} around "
                        f"diurnal_mean {part.diurnal_mean} leaves [0, 1]; allowed: at most "
                        f"{min(part.diurnal_mean, 1 - part.diurnal_mean):g}")

    sel = cfg.pattern_selection
    if sel.at_round > fed.rounds:
        problems.append(f"pattern_selection.at_round: {sel.at_round} exceeds federated.rounds "
                        f"({fed.rounds}); use 0 for the last round")

    faults = cfg.faults
    if faults.fail + faults.straggle + faults.dropout > 1 + 1e-12:
        problems.append(f"faults: fail + straggle + dropout = "
                        f"{faults.fail + faults.straggle + faults.dropout:g} exceeds 1 (each is a "
                        "fraction of the sampled clients)")
    late = [k for k in ("straggle", "dropout") if getattr(faults, k) > 0]
    if late and fed.round_timeout == 0:
        problems.append(f"faults.{late[0]}: late clients need a deadline; set "
                        "federated.round_timeout > 0 (without one a real server would wait for "
                        "ever)")

    dp = cfg.privacy
    # The sensitivity C / k of the mean holds only when every update weighs the same.
    if dp.clipping != "none" and fed.aggregation != "uniform":
        problems.append(f"privacy.clipping: {dp.clipping!r} requires federated.aggregation "
                        f"'uniform' (got {fed.aggregation!r}): example weights would let one "
                        "client move the mean by more than clipping_norm / clients")
    if dp.noise_multiplier > 0 and dp.clipping == "none":
        problems.append(f"privacy.noise_multiplier: {dp.noise_multiplier} needs a bound on each "
                        "update: set privacy.clipping to 'server' or 'client'")
    # The accountant's amplification assumes every client equally likely to be sampled.
    if dp.noise_multiplier > 0 and cfg.participation.model != "uniform":
        problems.append(f"privacy.noise_multiplier: the privacy account assumes uniform client "
                        f"sampling; participation.model is {cfg.participation.model!r} (use "
                        "'uniform' with differential privacy)")
    if fed.sampling == "poisson" and fed.mode != "cross_device":
        problems.append(f"federated.sampling: 'poisson' needs federated.mode 'cross_device' (got "
                        f"{fed.mode!r}); cross-silo takes every silo every round")
    # Whether a round updated would reveal whether anybody was sampled: the account assumes a
    # release every round (docs/privacy.md).
    if fed.sampling == "poisson" and dp.noise_multiplier > 0 and fed.min_replies != 1:
        problems.append(f"federated.min_replies: {fed.min_replies} does not go with "
                        "federated.sampling 'poisson' and privacy.noise_multiplier > 0: a private "
                        "Poisson round releases its noisy mean whatever the number of replies; "
                        "use 1")
    return problems

