"""The typed configuration schema, its loader and its validation.

The dataclasses below are the single source of truth for every configuration key: its type, default,
one-line description, allowed values and range. The YAML loader, the ``key=value`` overrides of the
CLI, the Flower run-config mapping (flat dotted keys) and ``docs/configuration.md`` all derive from
them, so adding a key means adding one ``_field(...)`` line here (plus a cross-field rule if needed).

Field metadata (read by :func:`schema`): ``help`` (one line), optional ``choices`` (a tuple of
strings), ``min`` / ``max`` (numeric bounds, inclusive unless ``min_exclusive`` / ``max_exclusive``).
For ``tuple[int, ...]`` fields the bounds apply to each element; for ``tuple[str, ...]`` fields the
choices do, and no element may repeat. Lists are stored as tuples so that a ``Config`` is immutable
and hashable; YAML and dicts use lists.

Every user mistake raises :class:`~fedmaml.errors.ConfigError` naming the full key path, the bad
value and what is allowed. Field-level problems are collected and reported together; cross-field
rules (:func:`cross_field_problems`) run only once every field is individually valid.
"""


import dataclasses
import difflib
import json
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fedmaml.errors import ConfigError

#: A value of a flat (Flower run-config) mapping.
Scalar = Union[bool, int, float, str]


def _field(default: Any, help: str, *, choices: Sequence[str] | None = None,
           min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
    """A schema field: ``dataclasses.field`` with the metadata the loader, CLI and docs read."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if min is not None:
        meta["min"] = min
        meta["min_exclusive"] = min_exclusive
    if max is not None:
        meta["max"] = max
        meta["max_exclusive"] = max_exclusive
    return field(default=default, metadata=meta)


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------

DATA_FAMILIES = ("sinusoid", "sinusoid_grid", "synthetic", "digits", "mnist1d", "omniglot", "femnist",
                 "files", "flower")
# files and flower are a user's own data, images or not (the model checks the shape it gets)
IMAGE_FAMILIES = ("digits", "omniglot", "femnist", "files", "flower")
ALGORITHM_NAMES = ("moml", "per_fedavg", "fedmeta", "reptile", "fedavg")


@dataclass(frozen=True)
class DataConfig:
    family: str = _field("sinusoid", "Task family (data set or generator).", choices=DATA_FAMILIES)
    path: str = _field("", "Data directory or file, for omniglot, femnist and files.")
    num_clients: int = _field(100, "Number of training clients.", min=1)
    unseen_clients: int = _field(0, "Clients held out from training, evaluated only.", min=0)
    tasks_per_client: int = _field(1, "Tasks per client (silo).", min=1)
    partition: str = _field("dirichlet", "How examples are split among clients.",
                            choices=("iid", "dirichlet", "classes", "natural"))
    dirichlet_alpha: float = _field(0.5, "Concentration of the Dirichlet label partition.",
                                    min=0, min_exclusive=True)
    classes_per_client: int = _field(2, "Classes per client for the 'classes' partition.", min=1)
    n_way: int = _field(0, "0 = a client keeps global labels; N > 0 = each task is N-way, relabelled "
                           "0..N-1.", min=0)
    heldout_fraction: float = _field(0.2, "Fraction of a client's examples held out for evaluation.",
                                     min=0, max=1, min_exclusive=True, max_exclusive=True)
    eval_adapt_size: int = _field(10, "Examples a client adapts on at evaluation.", min=1)
    eval_heldout_size: int = _field(100, "Held-out evaluation examples per task (generated families).",
                                    min=1)
    eval_points: str = _field("separate", "Sinusoid evaluation points: separate (each task adapts on "
                                          "its own points and is measured on other ones) or shared "
                                          "(the MOML public code's: one set drawn with seed 2021 for "
                                          "every task, adapting on its first eval_adapt_size and "
                                          "measuring on all of them).",
                              choices=("separate", "shared"))
    synthetic_alpha: float = _field(1.0, "Synthetic(alpha, beta): model heterogeneity.", min=0)
    synthetic_beta: float = _field(1.0, "Synthetic(alpha, beta): data heterogeneity.", min=0)
    mnist1d_samples: int = _field(4000, "Examples generated for mnist1d.", min=100)
    client_column: str = _field("client", "files: the client-id column of one NPZ or CSV file.")
    label_column: str = _field("label", "files, flower: the target column (CSV, dict batches).")
    input_column: str = _field("", "flower: the input key of dict batches; empty = the only other "
                                   "key.")
    flower_task: str = _field("", "flower: a Flower app's task module, 'package.module' (its "
                                  "load_data) or 'package.module:function'.")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _field("mlp", "Model: mlp, conv4, linear (an MLP without hidden layers), or your own "
                              "torch.nn.Module as an import path 'package.module:factory' "
                              "(docs/custom.md).")
    kwargs: str = _field("", "Keyword arguments of a model.name factory: a mapping such as "
                             "{width: 32} (kept as JSON text).")
    groups: str = _field("", "Layer groups of your own module for Lambda patterns: a mapping "
                             "group -> parameter-name prefixes, input side first (kept as JSON "
                             "text); empty = its top-level children that own parameters.")
    loss: str = _field("auto", "The task loss: auto (cross-entropy for integer labels, MSE for "
                               "float targets), mse, cross_entropy, or your own as an import path "
                               "'package.module:function' of f(prediction, target) -> a scalar "
                               "tensor (pure, so that vmap can batch it; docs/custom.md).")
    init_seed: int = _field(-1, "Seed of the initial meta-model; -1 = the run seed (the MOML public "
                                "code starts every seed from one model: 1234).", min=-1)
    hidden: tuple[int, ...] = _field((40, 40), "Hidden layer widths of the MLP.", min=1)
    conv_width: int = _field(64, "Channels of each conv4 block.", min=1)
    conv_strided: bool = _field(False, "Strided convolutions instead of max-pooling in conv4.")


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = _field("moml", "Federated (meta-)learning algorithm: " + ", ".join(ALGORITHM_NAMES)
                       + ", or your own as an import path 'package.module:Name' (docs/custom.md).")
    kwargs: str = _field("", "Keyword arguments of your own algorithm.name: a mapping such as "
                             "{lam: 0.1} (kept as JSON text).")
    alpha: float = _field(0.01, "Inner (adaptation) step size.", min=0, min_exclusive=True)
    eta: float = _field(0.005, "Meta / local step size.", min=0, min_exclusive=True)
    beta: float = _field(0.3, "Memory momentum of MOML (1 = no memory).",
                         min=0, max=1, min_exclusive=True)
    inner_steps: int = _field(1, "Adaptation steps when the pattern is an alias (full, head, body).",
                              min=0)
    inner_pattern: str = _field("full", "Lambda pattern of the training adaptation.")
    memory_pattern: str = _field("", "Lambda pattern of MOML's memory update; empty = inner_pattern.")
    meta_gradient: str = _field("first_order", "Meta-gradient estimator.",
                                choices=("first_order", "second_order", "hessian_free"))
    hf_delta: float = _field(0.001, "Finite-difference step of the hessian_free estimator.",
                             min=0, min_exclusive=True)
    hf_perturbation: str = _field("absolute", "Step of the hessian_free estimator: hf_delta * v "
                                              "(absolute, Per-FedAvg's form) or hf_delta * v / ||v|| "
                                              "(normalized).",
                                  choices=("absolute", "normalized"))
    scale_by_beta: bool = _field(False, "Multiply the meta-gradient by beta, as the official MOML "
                                        "code does.")
    local_steps: int = _field(1, "Local meta-steps per round (H).", min=1)
    tasks_per_step: int = _field(1, "Tasks sampled per local step within a silo (B).", min=1)
    support_size: int = _field(5, "Support examples per adaptation (K).", min=1)
    query_size: int = _field(0, "Query examples per step; 0 = support_size.", min=0)
    init_support_size: int = _field(0, "Support examples of the memory initialisation (K0); "
                                       "0 = support_size.", min=0)
    memory_policy: str = _field("keep", "Memory of a client that rejoins: keep, reinit from w, or "
                                        "decay towards w every step.",
                                choices=("keep", "reinit", "decay_to_w"))
    memory_init: str = _field("current_model", "A client's first memory adapts the meta-model of its "
                                               "first round (current_model) or the initial meta-model "
                                               "(initial_model: as if every memory were made at the "
                                               "start, like the MOML public code).",
                              choices=("current_model", "initial_model"))
    loss_before: bool = _field(False, "Also report the training query loss at w before adaptation "
                                      "(loss_before in metrics.jsonl): one more forward pass per "
                                      "task and local step.")


@dataclass(frozen=True)
class FederatedConfig:
    mode: str = _field("cross_device", "cross_device samples clients; cross_silo uses all every round.",
                       choices=("cross_device", "cross_silo"))
    rounds: int = _field(100, "Number of federated rounds.", min=1)
    clients_per_round: int = _field(0, "Clients sampled per round (their expected number under "
                                       "sampling: poisson); 0 = use fraction.", min=0)
    fraction: float = _field(0.1, "Fraction of clients sampled per round.",
                             min=0, max=1, min_exclusive=True)
    sampling: str = _field("fixed", "cross_device: how a round's clients are drawn: fixed = exactly "
                                    "clients_per_round (or fraction of the clients), without "
                                    "replacement; poisson = each client independently with "
                                    "probability clients_per_round / clients (or fraction), so a "
                                    "cohort's size varies and can be 0 (docs/privacy.md).",
                           choices=("fixed", "poisson"))
    aggregation: str = _field("weighted", "Average client updates by example count or uniformly.",
                              choices=("weighted", "uniform"))
    server_optimizer: str = _field("sgd", "Optimizer applying the averaged update to w.",
                                   choices=("sgd", "momentum", "adam"))
    server_lr: float = _field(1.0, "Server learning rate.", min=0, min_exclusive=True)
    server_momentum: float = _field(0.9, "Momentum of the momentum server optimizer.",
                                    min=0, max=1, max_exclusive=True)
    adam_beta1: float = _field(0.9, "Adam server optimizer: beta1.", min=0, max=1, max_exclusive=True)
    adam_beta2: float = _field(0.999, "Adam server optimizer: beta2.", min=0, max=1,
                               max_exclusive=True)
    adam_eps: float = _field(1e-8, "Adam server optimizer: epsilon.", min=0, min_exclusive=True)
    min_replies: int = _field(1, "Replies needed for a round to count.", min=1)
    checkpoint_every: int = _field(0, "Write a checkpoint to resume from every this many rounds; "
                                      "0 = only when the run is stopped by SIGINT/SIGTERM.", min=0)
    max_failed_rounds: int = _field(3, "Consecutive rounds without a valid reply after which the "
                                       "run stops with status failed (a run without a valid reply "
                                       "in any round fails too, however few its rounds).", min=1)
    round_timeout: float = _field(0.0, "Seconds to wait for replies per round; 0 = no limit.", min=0)
    poll_interval: float = _field(0.01, "Seconds between the server's polls for replies on Flower's "
                                        "grids (the Ray engine, a SuperLink), growing to a tenth of "
                                        "the time waited (at most 1 s) in long rounds; Flower's own "
                                        "loop waits 0.1 s (simulation) or 3 s (SuperLink).",
                                  min=0.001)
    eval_every: int = _field(10, "Evaluate every this many rounds; 0 = only at the end.", min=0)
    eval_clients: int = _field(20, "Participating-side clients evaluated; 0 = all.", min=0)
    lr_decay_at: float = _field(0.0, "Fraction of rounds after which eta is divided by "
                                     "lr_decay_factor; 0 = never.", min=0, max=1, max_exclusive=True)
    lr_decay_factor: float = _field(10.0, "Divisor of eta at lr_decay_at.", min=1)


@dataclass(frozen=True)
class EvaluationConfig:
    steps: int = _field(10, "Adaptation steps at evaluation (k_eval).", min=0)
    pattern: str = _field("full", "Lambda pattern of the evaluation adaptation.")
    alpha: float = _field(0.0, "Adaptation step size at evaluation; 0 = algorithm.alpha.", min=0)
    from_memory: bool = _field(True, "Also evaluate starting from each client's memory.")
    tracking_error: bool = _field(True, "Memory algorithms: on evaluated clients that have a "
                                        "memory, also measure ||u_i - A_i(w)|| / ||A_i(w)|| "
                                        "(docs/participation.md).")


@dataclass(frozen=True)
class EngineConfig:
    name: str = _field("inprocess", "Execution engine.",
                       choices=("inprocess", "ray", "vectorized", "sharded"))
    num_cpus: float = _field(1.0, "CPUs per client under Ray (sharded: per shard actor).", min=0,
                             min_exclusive=True)
    num_gpus: float = _field(0.0, "GPUs per client under Ray (sharded: per shard actor; "
                                  "fractions share a device).", min=0)
    shards: int = _field(2, "sharded: Ray actors, each owning the clients whose id modulo shards "
                            "is its index, their memories and their part of every cohort.", min=1)
    placement: str = _field("spread", "sharded: Ray placement group strategy of the shard actors "
                                      "(one bundle of num_cpus/num_gpus each); none = no group.",
                            choices=("spread", "pack", "strict_spread", "strict_pack", "none"))
    ray_address: str = _field("", "Address of an existing Ray cluster; empty = start a local one.")
    discovery_timeout: float = _field(300.0, "ray: seconds to wait at the start for every "
                                             "simulated node (Ray actor) to answer; actors start "
                                             "slowly on a loaded machine.", min=0,
                                      min_exclusive=True)
    device: str = _field("cpu", "Torch device.", choices=("cpu", "cuda", "auto"))
    torch_threads: int = _field(1, "Torch intra-op threads; 0 = torch default.", min=0)
    max_cohort_size: int = _field(1024, "vectorized: most clients batched in one vmapped call "
                                        "(bounds its memory); 0 = no limit.", min=0)
    memory_budget_mb: float = _field(4096.0, "vectorized: RAM for the memory bank; beyond it the "
                                             "memories move to memory-mapped files.", min=0)
    memory_dir: str = _field("", "vectorized: directory of the memory-mapped bank; empty = a "
                                 "temporary directory, deleted after the run.")
    compile: bool = _field(False, "vectorized: torch.compile the cohort update; compiles once per "
                                  "cohort shape (minutes on a CPU), then runs faster: for long runs.")


@dataclass(frozen=True)
class FaultsConfig:
    fail: float = _field(0.0, "Fraction of sampled clients that raise instead of training, drawn "
                              "per (seed, client, round).", min=0, max=1)
    straggle: float = _field(0.0, "Fraction of sampled clients that train but reply after the "
                                  "round timeout.", min=0, max=1)
    dropout: float = _field(0.0, "Fraction of sampled clients that are away for the whole round "
                                 "(no work, no reply in time).", min=0, max=1)


PARTICIPATION_MODELS = ("uniform", "heterogeneous", "markov", "diurnal")
SPEED_MODELS = ("uniform", "lognormal")


@dataclass(frozen=True)
class ParticipationConfig:
    model: str = _field("uniform", "Who is available to be sampled each round (cross-device): "
                                   "uniform = everybody; heterogeneous = client i with its own "
                                   "probability p_i ~ Beta(beta_a, beta_b); markov = on/off "
                                   "availability chains; diurnal = a daily cycle over rounds. The "
                                   "cohort is drawn among the available clients, all of them when "
                                   "fewer than the cohort size (docs/participation.md).",
                        choices=PARTICIPATION_MODELS)
    beta_a: float = _field(2.0, "heterogeneous: first shape parameter of Beta(a, b), the "
                                "distribution of the clients' availability probabilities.",
                           min=0, min_exclusive=True)
    beta_b: float = _field(2.0, "heterogeneous: second shape parameter of Beta(a, b); the mean "
                                "availability is a / (a + b).", min=0, min_exclusive=True)
    markov_on_to_off: float = _field(0.1, "markov: probability that an available client is gone "
                                          "the next round (mean available stretch = 1 / this).",
                                     min=0, max=1, min_exclusive=True)
    markov_off_to_on: float = _field(0.1, "markov: probability that an absent client is back the "
                                          "next round (mean absent stretch = 1 / this).",
                                     min=0, max=1, min_exclusive=True)
    diurnal_period: int = _field(24, "diurnal: rounds per cycle.", min=1)
    diurnal_mean: float = _field(0.5, "diurnal: mean availability probability.", min=0, max=1)
    diurnal_amplitude: float = _field(0.4, "diurnal: amplitude of the availability probability "
                                           "around its mean.", min=0, max=1)
    diurnal_phase_spread: float = _field(1.0, "diurnal: clients' phases (time zones) are uniform "
                                              "over this fraction of a cycle; 0 = all in step.",
                                         min=0, max=1)
    speed: str = _field("uniform", "Simulated compute speed: each client's train-seconds is its "
                                   "measured time times its own multiplier; under "
                                   "federated.round_timeout > 0 a client over the deadline is late. "
                                   "uniform = 1 for everybody; lognormal = exp(speed_sigma * z), "
                                   "z ~ N(0, 1) drawn once per (seed, client) (median 1).",
                        choices=SPEED_MODELS)
    speed_sigma: float = _field(1.0, "lognormal speed: standard deviation of the log multiplier "
                                     "(0.7 puts the middle 90% of clients within a factor 3.2 of "
                                     "the median).", min=0, max=20)


#: What a selected Lambda pattern can replace (pattern_selection.apply_to).
PATTERN_TARGETS = ("inner", "memory", "evaluation")


@dataclass(frozen=True)
class PatternSelectionConfig:
    mode: str = _field("none", "Lambda-pattern selection: central = the server measures the "
                               "candidates on the validation clients' data; federated = the "
                               "validation clients measure them on their own data and device.",
                       choices=("none", "central", "federated"))
    epsilon: float = _field(1.0, "Quality the chosen pattern may lose against the full pattern, in "
                                 "epsilon_unit.", min=0)
    epsilon_unit: str = _field("auto", "accuracy_points = absolute accuracy points; loss_percent = "
                                       "percent of the full pattern's loss; auto = accuracy_points "
                                       "for classification, loss_percent for regression.",
                               choices=("auto", "accuracy_points", "loss_percent"))
    steps: int = _field(0, "Adaptation steps of the generated candidates; 0 = evaluation.steps.",
                        min=0)
    family: bool = _field(True, "Generate the structured candidates (top-k groups at every step; "
                                "full or top-K for the first m steps, then top-k with k < K); "
                                "false = full + candidates only.")
    max_top_k: int = _field(0, "Largest k of the top-k candidates and of the later steps of "
                               "the m-step schedules (their first steps' K ranges over all "
                               "groups); 0 = all groups but one.", min=0)
    full_steps: tuple[int, ...] = _field((1,), "Values of m for 'full (or top-K) for the first m "
                                               "steps, then top-k'.", min=1)
    candidates: tuple[str, ...] = _field((), "Extra candidate patterns (e.g. "
                                             "[00001x5, 00011x5]); aliases allowed.")
    at_round: int = _field(0, "Select after this round's training (its evaluation already uses the "
                              "choice); 0 = the last round.", min=0)
    apply_to: tuple[str, ...] = _field(PATTERN_TARGETS, "Uses of the chosen pattern after "
                                                        "selection; empty = only record the "
                                                        "choice.", choices=PATTERN_TARGETS)
    validation_clients: int = _field(10, "Training clients whose held-out split selects the "
                                         "pattern; 0 = all.", min=0)
    test_clients: int = _field(0, "Clients reporting test quality (unseen clients; training clients "
                                  "not used for validation when there are none); 0 = all.", min=0)
    warmup: int = _field(2, "Untimed adaptations per candidate before timing.", min=0)
    repeats: int = _field(5, "Timed adaptations per candidate (the median is used).", min=1)
    time_tolerance: float = _field(0.05, "Times within this fraction of the fastest count as ties, "
                                         "won by fewer adapted group-steps.", min=0)


#: Where client updates are clipped (privacy.clipping).
CLIPPING_MODES = ("none", "server", "client")


@dataclass(frozen=True)
class PrivacyConfig:
    clipping: str = _field("none", "Differential privacy of the updates (docs/privacy.md): server = "
                                   "the server clips each update to clipping_norm before averaging; "
                                   "client = each client clips its own update (the server checks "
                                   "the bound again); none = no clipping, no noise.",
                           choices=CLIPPING_MODES)
    clipping_norm: float = _field(1.0, "L2 bound of one client's whole update (all tensors).",
                                  min=0, min_exclusive=True)
    noise_multiplier: float = _field(0.0, "Gaussian noise std on the mean update, in units of "
                                          "clipping_norm / clients per round (expected, under "
                                          "Poisson sampling); 0 = clipping only.",
                                     min=0)
    delta: float = _field(1e-5, "delta at which summary.json reports the run's epsilon.",
                          min=0, max=1, min_exclusive=True, max_exclusive=True)


TRACKING_BACKENDS = ("tensorboard", "mlflow", "wandb")


@dataclass(frozen=True)
class TrackingConfig:
    backends: tuple[str, ...] = _field((), "Experiment trackers that log the run live: every "
                                           "round's metrics, the config, the summary, figures and "
                                           "model.pt (docs/tracking.md). Each needs its extra: "
                                           "pip install 'fedmaml[tensorboard]'.",
                                       choices=TRACKING_BACKENDS)
    project: str = _field("", "MLflow experiment and W&B project; empty = the sweep's directory name "
                              "for a run of a sweep, else 'fedmaml'.")
    mlflow_uri: str = _field("", "MLflow tracking URI; empty = sqlite:///<output_dir>/mlflow.db "
                                 "(files in <output_dir>/mlartifacts), shared by the runs of one "
                                 "output directory or sweep.")
    wandb_mode: str = _field("offline", "W&B mode: offline writes the run under the run directory "
                                        "(upload later with `wandb sync`); online needs `wandb "
                                        "login`.", choices=("offline", "online"))


@dataclass(frozen=True)
class Config:
    name: str = _field("run", "Run name, used in the run directory name.")
    seed: int = _field(0, "Seed of every random choice in the run.", min=0)
    output_dir: str = _field("results", "Directory under which run directories are created.")
    compare_with: tuple[str, ...] = _field((), "Algorithms (e.g. [fedavg, per_fedavg]) also run "
                                               "on this config, as baselines in the summary "
                                               "table.", choices=ALGORITHM_NAMES)
    data: DataConfig = _section(DataConfig, "Task family, clients and their data.")
    model: ModelConfig = _section(ModelConfig, "The model being meta-learned.")
    algorithm: AlgorithmConfig = _section(AlgorithmConfig, "Client-side update and its step sizes.")
    federated: FederatedConfig = _section(FederatedConfig, "Rounds, sampling, aggregation and the "
                                                           "server optimizer.")
    participation: ParticipationConfig = _section(
        ParticipationConfig, "Client availability under cross-device sampling "
                             "(docs/participation.md).")
    evaluation: EvaluationConfig = _section(EvaluationConfig, "Personalization evaluation.")
    engine: EngineConfig = _section(EngineConfig, "Where and how clients run.")
    pattern_selection: PatternSelectionConfig = _section(
        PatternSelectionConfig, "Lambda-pattern selection (docs/lambda_patterns.md).")
    faults: FaultsConfig = _section(FaultsConfig, "Injected client faults in training rounds, to "
                                                  "study robustness (docs/robustness.md).")
    privacy: PrivacyConfig = _section(PrivacyConfig, "Differential privacy of the meta-updates "
                                                     "(docs/privacy.md).")
    tracking: TrackingConfig = _section(TrackingConfig, "Experiment tracking (TensorBoard, MLflow, "
                                                        "W&B); it never changes the run's results.")


# --------------------------------------------------------------------------------------------------
# Cross-field rules: one function, one block per rule; each returns "key.path: message" strings.
# --------------------------------------------------------------------------------------------------

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
    if fed.clients_per_round > 0 and fed.min_replies > fed.clients_per_round:
        problems.append(f"federated.min_replies: {fed.min_replies} exceeds "
                        f"federated.clients_per_round ({fed.clients_per_round})")
    elif fed.min_replies > data.num_clients:
        problems.append(f"federated.min_replies: {fed.min_replies} exceeds "
                        f"data.num_clients ({data.num_clients})")

    model_names = ("mlp", "conv4", "linear")
    if cfg.model.name not in model_names and not _MODEL_PATH.match(cfg.model.name):
        problems.append(f"model.name: {cfg.model.name!r} is not allowed; allowed: "
                        f"{', '.join(model_names)}, or an import path 'package.module:factory' of "
                        "your own torch.nn.Module" + _suggest(cfg.model.name, model_names))
    loss_names = ("auto", "mse", "cross_entropy")
    if cfg.model.loss not in loss_names and not _MODEL_PATH.match(cfg.model.loss):
        problems.append(f"model.loss: {cfg.model.loss!r} is not allowed; allowed: "
                        f"{', '.join(loss_names)}, or an import path 'package.module:function' of "
                        "your own loss" + _suggest(cfg.model.loss, loss_names))
    alg_names = ALGORITHM_NAMES
    if alg.name not in alg_names and not _MODEL_PATH.match(alg.name):
        problems.append(f"algorithm.name: {alg.name!r} is not allowed; allowed: "
                        f"{', '.join(alg_names)}, or an import path 'package.module:Name' of your "
                        "own algorithm" + _suggest(alg.name, alg_names))
    for key in _MAPPING_KEYS:
        section, name = key.split(".")
        text = getattr(getattr(cfg, section), name)
        if text.strip():
            try:
                value = yaml.safe_load(text)
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


# --------------------------------------------------------------------------------------------------
# Introspection: the flat list of keys everything else derives from
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    """One configuration key, as declared in the schema."""

    path: str  # dotted, e.g. "algorithm.beta"; top-level keys have no dot
    type: Any  # str, int, float, bool, tuple[int, ...] or tuple[str, ...]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is tuple

    @property
    def item_type(self) -> type:
        """The type of a list's elements (int or str)."""
        return typing.get_args(self.type)[0]

    @property
    def type_name(self) -> str:
        return f"list[{self.item_type.__name__}]" if self.is_list else self.type.__name__

    def allowed(self) -> str:
        """What values are allowed, in words (for errors and docs)."""
        if self.choices is not None:
            return ("a list of distinct items among " if self.is_list else "one of ") + ", ".join(
                self.choices)
        rng = self.range_text()
        if self.is_list:
            return f"a list of integers, each {rng}" if rng else "a list of integers"
        if rng:
            return rng
        return {bool: "true or false", str: "any string"}.get(self.type, "any " + self.type_name)

    def range_text(self) -> str:
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return (f"{'(' if self.min_exclusive else '['}{_num(lo)}, "
                    f"{_num(hi)}{')' if self.max_exclusive else ']'}")
        if lo is not None:
            return f"{'>' if self.min_exclusive else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.max_exclusive else '<='} {_num(hi)}"
        return ""

    def in_range(self, x: float) -> bool:
        if self.min is not None and (x <= self.min if self.min_exclusive else x < self.min):
            return False
        if self.max is not None and (x >= self.max if self.max_exclusive else x > self.max):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def sections() -> list[tuple[str, type, str]]:
    """``(name, dataclass, help)`` of each section of :class:`Config`, in schema order."""
    return [(f.name, f.type, f.metadata["help"]) for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(f.type)]


def _leaf_specs(cls: type, prefix: str) -> list[FieldSpec]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            continue
        m = f.metadata
        out.append(FieldSpec(path=prefix + f.name, type=f.type, default=f.default, help=m["help"],
                             choices=m.get("choices"), min=m.get("min"), max=m.get("max"),
                             min_exclusive=m.get("min_exclusive", False),
                             max_exclusive=m.get("max_exclusive", False)))
    return out


def schema() -> list[FieldSpec]:
    """Every leaf key of the schema: top-level keys first, then each section's, in schema order."""
    specs = _leaf_specs(Config, "")
    for name, cls, _ in sections():
        specs += _leaf_specs(cls, name + ".")
    return specs


_SPECS: dict[str, FieldSpec] = {s.path: s for s in schema()}


# --------------------------------------------------------------------------------------------------
# Building and validating a Config from a nested dict
# --------------------------------------------------------------------------------------------------

def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if getattr(value, "yaml_text", None):
        return str(int(value))
    if value is None:
        return "null (empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass: never accept it


def _check_value(spec: FieldSpec, value: Any, problems: list[str]) -> Any:
    """Return ``value`` converted to the field's type, or append a problem and return None."""
    where = spec.path
    if spec.type is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_show(value)}")
            return None
        return value
    if spec.type is str:
        if spec.path in _MAPPING_KEYS and isinstance(value, Mapping):
            return json.dumps(dict(value))  # order kept: groups are input side first
        if not isinstance(value, str):
            hint = ""
            if getattr(value, "yaml_text", None):  # 011 -> 9: say what was written
                hint = (f" (YAML read {value.yaml_text} as the number {int(value)}; quote it: "
                        f"'{value.yaml_text}')")
            elif _is_int(value) or isinstance(value, float):
                hint = f" (YAML read it as a number; quote it: '{value}')"
            problems.append(f"{where}: expected a string, got {_show(value)}{hint}")
            return None
        if spec.choices is not None and value not in spec.choices:
            problems.append(f"{where}: {value!r} is not allowed; allowed: {', '.join(spec.choices)}"
                            + _suggest(value, spec.choices))
            return None
        return value
    if spec.type is int:
        if not _is_int(value):
            problems.append(f"{where}: expected an integer, got {_show(value)}")
            return None
        value = int(value)  # a plain int, not YAML's YamlInt
    elif spec.type is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept numeric strings so '1e-3' works everywhere.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {_show(value)}")
            return None
        value = float(value)
    elif spec.is_list and spec.item_type is str:
        return _check_str_list(spec, _as_list(value, str), problems)
    elif spec.is_list:
        value = _as_list(value, int)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list of integers such as 40,40 or [40, 40], "
                            f"got {_show(value)}")
            return None
        ok = True
        for i, item in enumerate(value):
            if not _is_int(item):
                problems.append(f"{where}[{i}]: expected an integer, got {_show(item)}")
                ok = False
            elif not spec.in_range(item):
                problems.append(f"{where}[{i}]: {item} is out of range; allowed: {spec.range_text()}")
                ok = False
        return tuple(int(v) for v in value) if ok else None
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported schema type {spec.type!r} for {where}")
    if not spec.in_range(value):
        problems.append(f"{where}: {_show(value)} is out of range; allowed: {spec.range_text()}")
        return None
    return value


#: String keys that take a mapping in YAML and keep it as JSON text (a Config is flat and hashable).
_MAPPING_KEYS = ("model.kwargs", "model.groups", "algorithm.kwargs")
#: ``model.name`` of a user's module: an import path, or ``python:...`` (a Python object; fedmaml.run)
_MODEL_PATH = re.compile(r"^(python:.+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")


def _check_str_list(spec: FieldSpec, value: Any, problems: list[str]) -> Any:
    """A list of distinct strings, each among the field's choices (when it has some)."""
    where, example = spec.path, (spec.choices or ("a", "b"))[:2]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{where}: expected a list such as {','.join(example)} or "
                        f"[{', '.join(example)}], got {_show(value)}")
        return None
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{where}[{i}]: expected a string, got {_show(item)}")
            ok = False
        elif spec.choices is not None and item not in spec.choices:
            problems.append(f"{where}[{i}]: {item!r} is not allowed; allowed: "
                            f"{', '.join(spec.choices)}" + _suggest(item, spec.choices))
            ok = False
        elif spec.choices is not None and item in value[:i]:
            problems.append(f"{where}[{i}]: {item!r} appears twice")
            ok = False
    return tuple(value) if ok else None


def _as_list(value: Any, item_type: type) -> Any:
    """One list syntax everywhere, parsed here only: a list key takes ``[a, b]`` (YAML), the text
    ``a,b`` (the command line, Flower's run config, whose values are scalars) or ``[a,b]`` as
    text, and a single item ``a`` as ``[a]``; empty text is the empty list. Items of a list of
    strings stay text as written (a pattern ``0001`` is not the number 1). Other values (true,
    0.5, a mapping) are left for the type check to refuse."""
    if isinstance(value, str):
        return _parse_list(value, item_type)
    if _is_int(value):
        value = [value]
    if item_type is str and isinstance(value, (list, tuple)):
        # YAML reads [0001, 11111] as numbers: take them back as written
        return [getattr(v, "yaml_text", None) or str(v) if _is_int(v) else v for v in value]
    return value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, appending every problem found."""
    if data is None:  # "data:" with nothing under it is an empty section
        data = {}
    if not isinstance(data, Mapping):
        what = f"section {prefix[:-1]!r}" if prefix else "the configuration"
        problems.append(f"{prefix[:-1] or '(top level)'}: {what} must be a mapping of keys, "
                        f"got {_show(data)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            known = sorted(fields)
            hint = _suggest(str(key), known) or f"; allowed keys: {', '.join(known)}"
            problems.append(f"{prefix}{key!s}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(f.type):
            kwargs[name] = _build(f.type, data[name], prefix + name + ".", problems)
        else:
            kwargs[name] = _check_value(_SPECS[prefix + name], data[name], problems)
    return None if problems else cls(**kwargs)


def _raise(source: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(f"{source}: {problems[0]}")
    listing = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"{source}: {len(problems)} problems:\n{listing}")


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validate a nested dict (missing keys take their defaults) and build a :class:`Config`.

    ``source`` names where the dict came from in error messages (a file name, "overrides"...).
    """
    problems: list[str] = []
    cfg = _build(Config, d, "", problems)
    if not problems:
        problems = cross_field_problems(cfg)
    if problems:
        _raise(source, problems)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict (lists, not tuples) that :func:`config_from_dict` turns back into ``cfg``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------------
# Dotted paths: overrides, flat (Flower run-config) mappings, replace
# --------------------------------------------------------------------------------------------------

def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for path "a.b", creating missing sections."""
    *parents, leaf = path.split(".")
    node = d
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: is a value ({_show(child)}), not a "
                              f"section, so {path!r} cannot be set")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value`` and parse the value as YAML (``[40,40]``, ``true``, ``1e-3``...).

    String keys take the text as written when YAML would read it as something else, so that
    ``evaluation.pattern=0001`` stays the string "0001" rather than the integer 1.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.path=value, "
                          f"e.g. algorithm.beta=0.5")
    if raw == "":
        return key, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the text; the type check decides whether it is fine
    spec = _SPECS.get(key)
    if spec is not None and spec.type is str and not isinstance(value, str):
        value = raw
    elif spec is not None and spec.is_list and spec.item_type is str:
        value = raw  # parsed as a list (fedmaml/config.py _as_list): [0001] stays the text 0001
    return key, value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``d`` with each ``key.path=value`` override applied, in order."""
    out = _deep_copy(d)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(out, key, value)
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def config_to_flat(cfg: Config) -> dict[str, Scalar]:
    """``{"algorithm.beta": 0.3, ...}``: every key as a Flower run-config scalar.

    Flower run-config values must be scalars, so lists are written as comma-separated strings
    (``model.hidden: "40,40"``); :func:`config_from_flat` reads them back.
    """
    flat: dict[str, Scalar] = {}
    for spec in schema():
        value = cfg
        for part in spec.path.split("."):
            value = getattr(value, part)
        flat[spec.path] = ",".join(str(v) for v in value) if spec.is_list else value
    return flat


def config_from_flat(flat: Mapping[str, Any], *, source: str = "run config") -> Config:
    """Build a :class:`Config` from dotted keys (a Flower run config); missing keys take defaults."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        try:
            _set_path(nested, str(key), value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return config_from_dict(nested, source=source)


def _parse_list(text: str, item_type: type) -> list[Any]:
    """"40,40" or "[40, 40]" -> [40, 40]; "a, b" or "['a', b]" -> ["a", "b"]; "" -> []. For an
    integer list, items that are not integers stay strings, for the type check of the key."""
    text = text.strip().removeprefix("[").removesuffix("]").strip()
    if not text:
        return []
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if len(part) >= 2 and part[0] == part[-1] and part[0] in "'\"":
            part = part[1:-1]  # [a, 'b'] as text: quoted as YAML would allow
        elif not part:  # "a,b," or "a,,b": no item between the commas
            continue
        if item_type is int:
            try:
                items.append(int(part))
                continue
            except ValueError:
                pass
        items.append(part)
    return items


def replace_paths(cfg: Config, updates: Mapping[str, Any]) -> Config:
    """A validated copy of ``cfg`` with several dotted keys changed at once.

    Changing keys together matters when a cross-field rule links them (e.g. algorithm.name and
    algorithm.meta_gradient): one at a time, the intermediate config could be invalid.
    """
    d = config_to_dict(cfg)
    for path, value in updates.items():
        if path not in _SPECS:
            raise ConfigError(f"{path}: unknown key" + _suggest(path, list(_SPECS)))
        _set_path(d, path, value)
    return config_from_dict(d)


def replace_path(cfg: Config, path: str, value: Any) -> Config:
    """A validated copy of ``cfg`` with one dotted key changed.

    ``replace_path(cfg, "algorithm.beta", 0.7)``; see :func:`replace_paths` for linked keys.
    """
    return replace_paths(cfg, {path: value})


def resolve_key(key: str, values: Sequence[Any] = ()) -> str:
    """The full dotted key that ``key`` names: a full key, or a dotted suffix of exactly one key.

    ``beta`` -> ``algorithm.beta``. When a suffix fits several keys, ``values`` (if given) settle it
    if exactly one of those keys accepts them all: ``mode`` with ``cross_silo`` is
    ``federated.mode``. An unknown or still ambiguous key (``alpha`` with 0.1: ``algorithm.alpha`` or
    ``evaluation.alpha``) is a ConfigError listing the candidates.
    """
    if "." in key and key in _SPECS:
        return key
    matches = [p for p in _SPECS if p == key or p.endswith("." + key)]
    if len(matches) > 1 and values:
        fitting = [p for p in matches if all(_accepts(_SPECS[p], v) for v in values)]
        matches = fitting or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        leaves = sorted({p.rsplit(".", 1)[-1] for p in _SPECS} | set(_SPECS))
        raise ConfigError(f"{key}: unknown key" + _suggest(key, leaves))
    raise ConfigError(f"{key}: ambiguous key, it could be {', '.join(matches)}; write the full key")


def _accepts(spec: FieldSpec, value: Any) -> bool:
    problems: list[str] = []
    _check_value(spec, value, problems)
    return not problems


def check_value(path: str, value: Any) -> None:
    """Raise the ConfigError of ``value`` for key ``path`` on its own (type, choices, range), without
    the rules linking several keys."""
    problems: list[str] = []
    _check_value(_SPECS[path], value, problems)
    if problems:
        raise ConfigError(problems[0])


def short_key(path: str) -> str:
    """The shortest dotted suffix of ``path`` that :func:`resolve_key` maps back to it."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[i:])
        try:
            if resolve_key(candidate) == path:
                return candidate
        except ConfigError:
            continue
    return path


# --------------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlInt(int):
    """An integer that YAML read from text other than its decimal spelling (``011`` is 9 in
    YAML 1.1, ``0001`` is 1): ``yaml_text`` keeps what was written, for error messages."""

    yaml_text: str = ""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    if node.value.strip() == str(value):
        return value
    out = YamlInt(value)
    out.yaml_text = node.value.strip()
    return out


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        # PyYAML's own text names "<unicode string>"; point at the file and line instead.
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}: invalid YAML: {problem}"
                          + (f" ({context})" if context else "")) from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (or holds only comments); write at "
                          "least one key, e.g. 'name: my-run' (the others take their defaults; "
                          "`fedmaml config show` lists them)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (e.g. 'name: run'), "
                          f"got a {type(data).__name__}")
    return data


#: The top-level section of a sweep file: a config plus the grid and seeds that ``fedmaml sweep``
#: expands (validated in fedmaml/sweep_spec.py). A run's own config never has one.
SWEEP_SECTION = "sweep"


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    if SWEEP_SECTION in data:
        raise ConfigError(f"{path}: has a '{SWEEP_SECTION}:' section, which describes several runs; "
                          f"run it with `fedmaml sweep {path}`, or remove the section to run one "
                          "config")
    return _config_from_data(data, path, overrides)


def load_config_and_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Any]:
    """A config file that may hold a ``sweep:`` section: the config without it, and the section's
    raw value (None when absent) for :mod:`fedmaml.sweep` to validate."""
    data = _read_yaml(Path(path))
    sweep = data.pop(SWEEP_SECTION, None)
    return _config_from_data(data, path, overrides), sweep


def _config_from_data(data: dict[str, Any], path: str | Path | None,
                      overrides: Sequence[str]) -> Config:
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with overrides"
    return config_from_dict(data, source=source)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, inline lists ("hidden: [40, 40]"), as a person would write them."""


_Dumper.add_representer(YamlInt, yaml.SafeDumper.represent_int)
yaml.SafeDumper.add_representer(YamlInt, yaml.SafeDumper.represent_int)  # sweep manifests
_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                          flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The config as YAML (every key, schema order) that :func:`load_config` reads back unchanged."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------------------

def _default_text(spec: FieldSpec) -> str:
    value = spec.default
    if spec.is_list:
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _allowed_md(spec: FieldSpec) -> str:
    if spec.choices is not None:
        listed = ", ".join(f"`{c}`" for c in spec.choices)
        return f"any of {listed}, each once" if spec.is_list else listed
    rng = spec.range_text()
    if spec.is_list:
        return f"each {rng}" if rng else ("integers" if spec.item_type is int else "strings")
    if rng:
        return rng
    return "`true`, `false`" if spec.type is bool else "any"


def config_reference_markdown() -> str:
    """A Markdown table per section: key, type, default, allowed values, description."""
    header = "| Key | Type | Default | Allowed | Description |\n|---|---|---|---|---|\n"

    def table(specs: list[FieldSpec]) -> str:
        return header + "".join(
            f"| `{s.path}` | {s.type_name} | {_default_text(s)} | {_allowed_md(s)} | {s.help} |\n"
            for s in specs)

    specs = schema()
    parts = ["## Top level\n\n" + table([s for s in specs if "." not in s.path])]
    for name, _, help in sections():
        parts.append(f"## `{name}`\n\n{help}\n\n"
                     + table([s for s in specs if s.path.startswith(name + ".")]))
    parts.append("## Rules involving several keys\n\n"
                 + "".join(f"- {rule}\n" for rule in CROSS_FIELD_RULES))
    parts.append(_SWEEP_SECTION_DOC)
    return "\n".join(parts)


_SWEEP_SECTION_DOC = f"""## `{SWEEP_SECTION}` (sweep files only)

A file given to `fedmaml sweep` may add a `{SWEEP_SECTION}:` section (`fedmaml run` refuses such a
file). `grid` maps keys (full, or an unambiguous suffix: `beta` for `algorithm.beta`) to lists of
values; every combination runs once per seed. `settings` (optional) names override sets, such as
`MOML: {{algorithm.name: moml, algorithm.eta: 0.005}}`, crossed with the grid; `references` gives a
named setting a number reported elsewhere, shown by `fedmaml compare`. `seeds` is a list of integers
or a range such as `"0-4"` (default: the `seed` key). See docs/comparing.md.

```yaml
{SWEEP_SECTION}:
  grid:
    algorithm.beta: [0.3, 0.5, 0.9]
    mode: [cross_device, cross_silo]
  seeds: "0-4"
```
"""
