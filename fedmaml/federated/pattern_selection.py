"""Lambda-pattern selection inside a run and from the CLI: the glue around
:mod:`fedmaml.core.pattern_selection`.

* **Central** (``pattern_selection.mode: central``, and ``fedmaml select-pattern``): this process
  measures every candidate on the validation clients' held-out splits, times it here, and applies the
  rule; test quality comes from the test clients (:func:`~fedmaml.core.pattern_selection.
  validation_and_test_clients`).
* **Federated** (``mode: federated``): the server sends a ``query.select`` message (the meta-model
  and the candidate list) to the validation clients; each measures quality on its own held-out split
  and times the adaptation on its own device (:func:`handle_select`, the ClientApp's handler). The
  server merges the replies (example-weighted quality, median time), applies the rule, and asks the
  test clients for the candidates' test quality (no timing).

Either way :class:`PatternSelector` then switches patterns for the rest of the run: the chosen
pattern travels to clients in the train and evaluate ConfigRecords (keys :data:`INNER`,
:data:`MEMORY`, :data:`EVAL`), which override the config's patterns on the client. With selection
off, nothing is added to those records and clients use the config's patterns as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmaml.algorithms import Hyper
from fedmaml.atomic import atomic_write_text
from fedmaml.client.evaluate import evaluation_tasks
from fedmaml.config.schema import Config
from fedmaml.core import pattern_selection as ps
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern, resolve_pattern
from fedmaml.errors import ConfigError, MessageError, PatternError
from fedmaml.federated import records as R
from fedmaml.federated.setup import ExperimentSetup, resolve_device, use_torch_threads
from fedmaml.results.progress import status
from fedmaml.results.recorder import _clean

log = logging.getLogger("fedmaml")

#: Message type of a selection request (handled by ``@app.query("select")``).
SELECT = "query.select"
#: Train/evaluate ConfigRecord keys carrying a selected pattern (canonical text).
INNER, MEMORY, EVAL = "inner-pattern", "memory-pattern", "eval-pattern"
#: Selection request/reply keys.
CANDIDATES, WARMUP, REPEATS = "candidates", "warmup", "repeats"
QUALITY, LOSS, MS, THREADS = "quality", "loss", "ms", "torch-threads"
#: The run-directory file holding a run's selection (federated or central mode).
RUN_FILE = "pattern_selection.json"


# --------------------------------------------------------------------------------------------------
# What to select from
# --------------------------------------------------------------------------------------------------

def selection_steps(cfg: Config) -> int:
    """Steps of the generated candidates: ``pattern_selection.steps``, else ``evaluation.steps``."""
    steps = cfg.pattern_selection.steps or cfg.evaluation.steps
    if steps < 1:
        raise ConfigError("pattern_selection.steps: 0 means evaluation.steps, which is 0 too; "
                          "candidates need at least one adaptation step (set pattern_selection.steps)")
    return steps


def candidates_for(setup: ExperimentSetup) -> list[ps.Candidate]:
    """The candidate list of a run's ``pattern_selection`` section."""
    sel = setup.config.pattern_selection
    steps = selection_steps(setup.config)
    return ps.build_candidates(setup.model.group_names, steps, model_name=setup.model.name,
                               family=sel.family, max_top_k=sel.max_top_k,
                               full_steps=sel.full_steps, user=sel.candidates)


def epsilon_unit(setup: ExperimentSetup) -> str:
    return ps.resolve_unit(setup.config.pattern_selection.epsilon_unit, setup.classification)


# --------------------------------------------------------------------------------------------------
# Measuring on one client (the ClientApp handler, and the central path's loop)
# --------------------------------------------------------------------------------------------------

def measure_client(setup: ExperimentSetup, cid: int, w: Params, patterns: Sequence[Pattern], *,
                   warmup: int, repeats: int, device: torch.device | None = None) -> ps.Measurement:
    """Quality of each pattern on client ``cid``'s evaluation splits (a training client's held-out
    data, validation: training never sees it; an unseen client's, test); times on its first task
    (``repeats = 0``: no timing, e.g. for test clients)."""
    device = device or torch.device("cpu")
    splits = [tuple(t.to(device) for t in task.evaluation_split())
              for task in evaluation_tasks(setup, cid)]
    params = {k: v.to(device) for k, v in w.items()}
    return ps.measure_candidates(setup.model, params, setup.loss_fn, splits, patterns,
                                 setup.eval_alpha, setup.classification, warmup=warmup,
                                 repeats=max(repeats, 1), timed_splits=1 if repeats > 0 else 0)


def handle_select(setup: ExperimentSetup, cid: int, msg: Message) -> Message:
    """The ClientApp's ``query.select`` handler: measure the candidates the server sent."""
    config = msg.content[R.CONFIG]
    patterns = [_received(t, setup, "selection request") for t in config[CANDIDATES]]
    w = R.from_record(msg.content[R.ARRAYS], setup.initial_params, "selection request")
    m = measure_client(setup, cid, w, patterns, warmup=int(config[WARMUP]),
                       repeats=int(config[REPEATS]),
                       device=resolve_device(setup.config.engine.device))
    reply: dict[str, Any] = {QUALITY: list(m.quality), LOSS: list(m.loss),
                             R.NUM_EXAMPLES: m.examples, R.PARTITION: cid,
                             THREADS: torch.get_num_threads()}
    if int(config[REPEATS]) > 0:
        reply[MS] = list(m.ms)
    return Message(RecordDict({R.METRICS: MetricRecord(reply)}), reply_to=msg)


def measurement_from_reply(metrics: MetricRecord, patterns: Sequence[str], metric: str,
                           timed: bool) -> ps.Measurement:
    """A client's reply as a :class:`~fedmaml.core.pattern_selection.Measurement`, checked."""
    n = len(patterns)
    cols = {}
    for key in (QUALITY, LOSS) + ((MS,) if timed else ()):
        values = [float(v) for v in metrics[key]]
        if len(values) != n:
            raise MessageError(f"selection reply: {key!r} has {len(values)} values for {n} candidates")
        cols[key] = tuple(values)
    examples = int(metrics[R.NUM_EXAMPLES])
    if examples <= 0:
        raise MessageError(f"selection reply: num-examples is {examples}")
    return ps.Measurement(tuple(patterns), metric, cols[QUALITY], cols[LOSS],
                          cols.get(MS, (math.nan,) * n), examples)


# --------------------------------------------------------------------------------------------------
# Selecting: shared by both modes
# --------------------------------------------------------------------------------------------------

#: ``measure(client_ids, patterns, timed) -> (measurements, info)``: how one mode gets numbers.
Measurer = Callable[[list[int], list[Pattern], bool], tuple[list[ps.Measurement], dict[str, Any]]]


def select(setup: ExperimentSetup, measure: Measurer, *, mode: str) -> dict[str, Any]:
    """Measure the candidates on the validation clients, apply the rule, measure test quality.

    Returns a JSON-ready record: the rule's outcome and one row per candidate (time, validation
    quality, change vs full, speedup, test quality), plus who measured and where.
    """
    cfg = setup.config
    sel = cfg.pattern_selection
    candidates = candidates_for(setup)
    valid = [c for c in candidates if c.valid]
    invalid = [c for c in candidates if not c.valid]
    for c in invalid:
        log.warning("pattern selection: candidate %r is invalid and skipped: %s", c.text, c.error)
    fed = setup.federation
    val_ids, test_ids = ps.validation_and_test_clients(
        fed.num_clients, fed.num_unseen, sel.validation_clients, sel.test_clients,
        cfg.seed)
    unit = epsilon_unit(setup)
    metric = "accuracy" if setup.classification else "loss"
    record: dict[str, Any] = {
        "mode": mode, "metric": metric, "steps": selection_steps(cfg), "validation_clients": val_ids,
        "test_clients": test_ids, "timing": {"warmup": sel.warmup, "repeats": sel.repeats,
                                             **ps.machine_info()}}
    # a minute or more: say so (the progress line, or a log line) rather than go silent
    status(f"pattern selection: {len(valid)} candidates on {len(val_ids)} validation clients",
           force=True)
    parts, info = measure(val_ids, [c.pattern for c in valid], True)
    record["timing"].update(info)
    if not parts:
        record.update(chosen=None, reason="no validation client replied; patterns unchanged",
                      rows=[{"pattern": c.text, "error": c.error} for c in invalid])
        return record
    merged = ps.combine_measurements(parts)
    full = str(candidates[0].pattern)  # build_candidates puts the full pattern first
    choice = ps.select_pattern(merged, full, sel.epsilon, unit, time_tolerance=sel.time_tolerance,
                               invalid=invalid)
    record.update(choice.to_dict())
    record["validation_examples"] = merged.examples
    record["validation_replies"] = merged.sources
    if test_ids:
        status(f"pattern selection: test quality on {len(test_ids)} clients")
        tests, _ = measure(test_ids, [c.pattern for c in valid], False)
        if tests:
            test = ps.combine_measurements(tests)
            for row in record["rows"]:
                if "error" not in row:
                    row["test_" + metric] = test.quality[test.patterns.index(row["pattern"])]
            record["test_examples"] = test.examples
    return record


def central_measurer(setup: ExperimentSetup, w: Params) -> Measurer:
    """Measure on this process: every client's data is rebuilt here from the config and seed."""
    sel = setup.config.pattern_selection
    device = resolve_device(setup.config.engine.device)
    use_torch_threads(setup.config.engine)  # time with the threads clients would use

    def measure(cids: list[int], patterns: list[Pattern], timed: bool
                ) -> tuple[list[ps.Measurement], dict[str, Any]]:
        parts = []
        for i, c in enumerate(cids):
            status(f"pattern selection: {'timing' if timed else 'testing'} on client "
                   f"{i + 1}/{len(cids)}")
            parts.append(measure_client(setup, c, w, patterns, warmup=sel.warmup,
                                        repeats=sel.repeats if timed else 0, device=device))
        return parts, {"where": "this process", "device": str(device)}
    return measure


def table_text(record: Mapping[str, Any]) -> str:
    """The record as the CLI prints it."""
    if record.get("chosen") is None:
        return f"no choice: {record.get('reason')}"
    rows = tuple(record["rows"])
    selection = ps.Selection(record["chosen"], record["full"], record["epsilon"],
                             record["epsilon_unit"], record["reason"], rows)
    metric = record["metric"]
    test = {r["pattern"]: r["test_" + metric] for r in rows if "test_" + metric in r}
    return ps.format_table(selection, metric, test or None)


# --------------------------------------------------------------------------------------------------
# The server side of a run
# --------------------------------------------------------------------------------------------------

class PatternSelector:
    """Runs the configured selection once, at ``at_round``, and then supplies the patterns that the
    train and evaluate instructions carry."""

    def __init__(self, setup: ExperimentSetup) -> None:
        self.setup = setup
        self.sel = setup.config.pattern_selection
        self.at_round = self.sel.at_round or setup.config.federated.rounds
        self.record: dict[str, Any] | None = None
        self._train: dict[str, str] = {}
        self._evaluate: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.sel.mode != "none"

    def due(self, server_round: int) -> bool:
        return self.enabled and self.record is None and server_round == self.at_round

    def train_config(self) -> dict[str, str]:
        return dict(self._train)

    def evaluate_config(self) -> dict[str, str]:
        return dict(self._evaluate)

    def run(self, w: Params, server_round: int, send: Callable[[list[Message]], list[Message]],
            nodes: Mapping[int, int]) -> dict[str, Any]:
        """Select on ``w`` now; ``send`` delivers messages (federated mode) and returns replies."""
        if self.sel.mode == "central":
            measure = central_measurer(self.setup, w)
        else:
            measure = self._federated_measurer(w, server_round, send, nodes)
        record = select(self.setup, measure, mode=self.sel.mode)
        record["round"] = server_round
        self.record = record
        if record.get("chosen") is not None:
            self._switch(record["chosen"])
            record["applied_to"] = sorted(set(self._train) | set(self._evaluate))
        log.info("pattern selection at round %d: %s (%s)", server_round, record.get("chosen"),
                 record.get("reason"))
        return record

    def _switch(self, chosen: str) -> None:
        targets = set(self.sel.apply_to)
        if "inner" in targets:
            self._train[INNER] = chosen
        # An empty algorithm.memory_pattern means "the inner pattern", so it follows the inner one.
        if "memory" in targets or ("inner" in targets and not self.setup.config.algorithm.memory_pattern):
            self._train[MEMORY] = chosen
        if "evaluation" in targets:
            self._evaluate[EVAL] = chosen

    def _federated_measurer(self, w: Params, server_round: int,
                            send: Callable[[list[Message]], list[Message]],
                            nodes: Mapping[int, int]) -> Measurer:
        metric = "accuracy" if self.setup.classification else "loss"

        def measure(cids: list[int], patterns: list[Pattern], timed: bool
                    ) -> tuple[list[ps.Measurement], dict[str, Any]]:
            texts = [str(p) for p in patterns]
            content = RecordDict({R.ARRAYS: R.to_record(w), R.CONFIG: ConfigRecord({
                CANDIDATES: texts, WARMUP: self.sel.warmup,
                REPEATS: self.sel.repeats if timed else 0, R.ROUND: server_round})})
            messages = [Message(content, nodes[c], SELECT, group_id=f"select-{server_round}")
                        for c in cids]
            parts, threads, failures = [], [], 0
            replies = send(messages)
            for reply in replies:
                if reply.has_error():
                    failures += 1
                    log.warning("pattern selection: client error: %s", reply.error.reason)
                    continue
                try:
                    m = reply.content[R.METRICS]
                    parts.append(measurement_from_reply(m, texts, metric, timed))
                    threads.append(int(m[THREADS]))
                except (KeyError, TypeError, ValueError, MessageError) as e:
                    failures += 1
                    log.warning("pattern selection: malformed reply: %s", e)
            failures += len(messages) - len(replies)  # missing replies (timeouts)
            info = {"where": "clients", "client_torch_threads": threads,
                    "failures" if timed else "test_failures": failures}
            return parts, info
        return measure


def hyper_for(hp: Hyper, config: Mapping[str, Any], setup: ExperimentSetup) -> Hyper:
    """The client's hyperparameters with the patterns a train instruction carries (if any)."""
    sent = {field: _received(config[key], setup, f"instruction key {key!r}")
            for key, field in ((INNER, "inner_pattern"), (MEMORY, "memory_pattern"))
            if key in config}
    return dataclasses.replace(hp, step=dataclasses.replace(hp.step, **sent)) if sent else hp


def eval_pattern_for(config: Mapping[str, Any], setup: ExperimentSetup) -> Pattern:
    """The evaluation pattern an evaluate instruction carries, or the config's."""
    return (_received(config[EVAL], setup, f"instruction key {EVAL!r}") if EVAL in config
            else setup.eval_pattern)


def _received(text: Any, setup: ExperimentSetup, where: str) -> Pattern:
    """A pattern a message carries, for the run's model; a ``MessageError`` naming ``where`` it
    was when it is not one."""
    try:
        return resolve_pattern(str(text), setup.model.group_names, 1, setup.model.name)
    except PatternError as e:
        raise MessageError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------

def write_selection(directory: str | Path, record: Mapping[str, Any], name: str = RUN_FILE) -> Path:
    """Write a selection record as JSON (atomically; NaN/inf become null), with the version and
    commit that made it (fedmaml/provenance.py)."""
    from fedmaml.provenance import with_provenance

    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(with_provenance(dict(record))), indent=2) + "\n")
    return path


def selection_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers a run summary keeps: the choice, its speedup and qualities against full."""
    out: dict[str, Any] = {k: record.get(k) for k in ("mode", "round", "chosen", "full", "epsilon",
                                                      "epsilon_unit", "reason")}
    chosen, full = record.get("chosen"), record.get("full")
    for row in record.get("rows", []):
        if row.get("pattern") == chosen:
            out.update({f"chosen_{k}": v for k, v in row.items() if k != "pattern"})
        if row.get("pattern") == full and full != chosen:
            out.update({f"full_{k}": v for k, v in row.items()
                        if k not in ("pattern", "qualifies", "change", "speedup")})
    return out


# --------------------------------------------------------------------------------------------------
# `fedmaml select-pattern`
# --------------------------------------------------------------------------------------------------

#: Where ``fedmaml select-pattern`` writes its record by default (next to the checkpoint); a name of
#: its own, so that it never overwrites the record of a run's in-run selection (:data:`RUN_FILE`).
CLI_FILE = "pattern_selection_central.json"


def load_checkpoint(path: str | Path, like: Params) -> Params:
    """A meta-model saved by a run (``model.pt``), checked against the config's model."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: no such file; give a run directory (with model.pt) "
                          "or --checkpoint FILE")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"checkpoint {path}: cannot be read as a torch state dict ({e})") from None
    if not isinstance(state, dict) or list(state) != list(like):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"checkpoint {path}: parameter names {got} do not match the config's "
                          f"model {sorted(like)}; was it saved by a run of this config?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(like[k].shape):
            raise ConfigError(f"checkpoint {path}: parameter {k!r} has shape {list(v.shape)}, the "
                              f"config's model needs {list(like[k].shape)}")
    return {k: v.to(like[k].dtype) for k, v in state.items()}


def _check_something_to_compare(setup: ExperimentSetup, given: str, no_family: str) -> None:
    """Refuse a selection whose candidates beside the full pattern are all invalid (a typo, a
    pattern for another model), before a minute of measuring that could only choose the full
    pattern. ``given``: where the candidates came from; ``no_family``: what turned the generated
    ones off."""
    candidates = candidates_for(setup)
    invalid = [c for c in candidates if not c.valid]
    if invalid and sum(c.valid for c in candidates) == 1:
        raise ConfigError(f"{given}: {ps.only_full_reason(invalid)}; with {no_family} no other "
                          "candidate is generated, so there is nothing to compare the full "
                          "pattern with")


def select_from_cli(target: str | Path, overrides: Sequence[str] = (), *,
                    epsilon: float | None = None, candidates: Sequence[str] | None = None,
                    family: bool | None = None, checkpoint: str | Path | None = None,
                    out: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Central selection on a run directory (its config.yaml and model.pt) or on a config file plus
    a checkpoint; returns the record and the JSON file it was written to."""
    from fedmaml.config import load_config, replace_paths
    from fedmaml.federated.setup import setup_for

    target = Path(target)
    if target.is_dir():
        config_path = target / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"{target}: a run directory needs config.yaml (is this a run "
                              "directory?)")
        checkpoint = Path(checkpoint) if checkpoint else target / "model.pt"
    else:
        config_path = target
        if checkpoint is None:
            raise ConfigError(f"{target}: with a config file, give the meta-trained model with "
                              "--checkpoint FILE (or pass a run directory instead)")
        checkpoint = Path(checkpoint)
    cfg = load_config(config_path, overrides)
    updates: dict[str, Any] = {}
    if epsilon is not None:
        updates["pattern_selection.epsilon"] = epsilon
    if candidates is not None:
        updates["pattern_selection.candidates"] = list(candidates)
    if family is not None:
        updates["pattern_selection.family"] = family
    if updates:
        cfg = replace_paths(cfg, updates)
    setup = setup_for(cfg)
    _check_something_to_compare(setup, "--candidates" if candidates is not None else
                                "pattern_selection.candidates",
                                "--only-candidates" if family is False else
                                "pattern_selection.family: false")
    w = load_checkpoint(checkpoint, setup.initial_params)
    record = select(setup, central_measurer(setup, w), mode="central")
    record["checkpoint"] = checkpoint.name
    path = write_selection(Path(out).parent if out else checkpoint.parent, record,
                           Path(out).name if out else CLI_FILE)
    return record, path
