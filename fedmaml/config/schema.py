"""The configuration schema: every key's section, type, default, help, choices and range.

The dataclasses below are the single source of truth for every configuration key. The YAML loader
(fedmaml/config/yaml_io.py), the ``key=value`` overrides of the CLI and the Flower run-config mapping
(fedmaml/config/paths.py) and ``docs/configuration.md`` (fedmaml/config/reference.py) all derive from
them, so adding a key means adding one ``_field(...)`` line here (plus a cross-field rule in
fedmaml/config/rules.py if needed).

Field metadata (read by :func:`schema`): ``help`` (one line), optional ``choices`` (a tuple of
strings), ``min`` / ``max`` (numeric bounds, inclusive unless ``min_exclusive`` / ``max_exclusive``).
For ``tuple[int, ...]`` fields the bounds apply to each element; for ``tuple[str, ...]`` fields the
choices do, and no element may repeat. Lists are stored as tuples so that a ``Config`` is immutable
and hashable; YAML and dicts use lists.
"""

import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

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
                             "{width: 32} (kept as JSON text); model.kwargs.width=32 sets one "
                             "entry.")
    groups: str = _field("", "Layer groups of your own module for Lambda patterns: a mapping "
                             "group -> parameter-name prefixes, input side first (kept as JSON "
                             "text); empty = its top-level children that own parameters; "
                             "model.groups.head=[fc] sets one entry.")
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
                             "{lam: 0.1} (kept as JSON text); algorithm.kwargs.lam=0.1 sets one "
                             "entry (as an override, a --grid key or in a sweep setting).")
    alpha: float = _field(0.01, "Inner (adaptation) step size.", min=0, min_exclusive=True)
    eta: float = _field(0.005, "Meta / local step size.", min=0, min_exclusive=True)
    beta: float = _field(0.3, "Memory momentum of MOML (1 = no memory).",
                         min=0, max=1, min_exclusive=True)
    inner_steps: int = _field(1, "Adaptation steps when inner_pattern (or memory_pattern) is an "
                                 "alias (full, head, body); a written-out pattern runs its own "
                                 "rows ('0001' one step, '0001x5' five).", min=0)
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
    steps: int = _field(10, "Adaptation steps at evaluation (k_eval) when pattern is an alias "
                            "(full, head, body); a written-out pattern runs its own rows ('0001' "
                            "one step, '0001x5' five).", min=0)
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
    compile: bool = _field(False, "vectorized (and sweep --vectorize): torch.compile the cohort "
                                  "update (a batch's update over runs); compiles once per shape "
                                  "(seconds for a small cohort of a small model, minutes for "
                                  "hundreds of clients), then runs faster: for long runs, e.g. "
                                  "one sinewave run of thousands of steps. Without a C++ "
                                  "compiler the update is traced (aot_eager) instead: about "
                                  "half the eager time.")


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



#: String keys that take a mapping in YAML and keep it as JSON text (a Config is flat and hashable).
#: One entry of one is a key of its own for overrides, grids and settings: ``algorithm.kwargs.lam``.
MAPPING_KEYS = ("model.kwargs", "model.groups", "algorithm.kwargs")


def mapping_entry(path: str) -> tuple[str, str] | None:
    """``("algorithm.kwargs", "lam")`` for ``algorithm.kwargs.lam``: the mapping key and the name of
    the one entry that ``path`` sets; None when ``path`` is no entry of a :data:`MAPPING_KEYS`
    key."""
    for key in MAPPING_KEYS:
        if path.startswith(key + ".") and len(path) > len(key) + 1:
            return key, path[len(key) + 1:]
    return None


#: ``model.name`` of a user's module: an import path, or ``python:...`` (a Python object; fedmaml.run)
IMPORT_PATH = re.compile(r"^(python:.+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")

#: The top-level section of a sweep file: a config plus the grid and seeds that ``fedmaml sweep``
#: expands (validated in fedmaml/sweep_spec.py). A run's own config never has one.
SWEEP_SECTION = "sweep"


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
    return [(f.name, typing.cast(type, f.type), f.metadata["help"])
            for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)]


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


SPECS: dict[str, FieldSpec] = {s.path: s for s in schema()}
