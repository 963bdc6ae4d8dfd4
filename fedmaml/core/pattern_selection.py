"""Lambda-pattern selection (Khabarlak's rule), as pure functions
(docs/algorithms.md#layer-groups-and-lambda-patterns, docs/lambda_patterns.md).

Three jobs, each independent of where it runs (the CLI, the server, a Flower client):

1. **Candidates** (:func:`build_candidates`): a structured family, not all ``2^(S*L)`` masks —
   the full pattern, the top ``k`` groups at every step, and "full for the first ``m`` steps, then
   the top ``k``" — plus user-given patterns. Invalid user patterns are kept as candidates with their
   pattern error, so they are reported instead of silently dropped.
2. **Measurement** (:func:`measure_candidates`): the quality of every candidate on some tasks
   (adapt on each task's adaptation split, measure on its held-out split) and the median wall time of
   the adaptation after warm-up (:func:`time_adaptation`). Several measurements (clients) are merged
   by :func:`combine_measurements`: example-weighted quality, median time.
3. **The rule** (:func:`select_pattern`): the fastest candidate whose quality is within ``epsilon``
   of the full pattern's. ``epsilon`` is in absolute accuracy points (``accuracy_points``: 1 = one
   percentage point) or in percent of the full pattern's loss (``loss_percent``: quality ``loss <=
   full * (1 + epsilon / 100)``). The full pattern always qualifies, so there is always a choice.

No flwr, no ray: the federated glue (:mod:`fedmaml.federated.pattern_selection`) calls these.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmaml.core.adaptation import adapt
from fedmaml.core.estimators import adapt_with_vjp, loss_grad
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, detach
from fedmaml.core.patterns import Pattern, resolve_pattern
from fedmaml.errors import PatternError
from fedmaml.core.staged import StagedModel

#: Units of epsilon. ``auto`` (a config value) means accuracy points for classification and loss
#: percent for regression.
EPSILON_UNITS = ("accuracy_points", "loss_percent")

#: A task's evaluation split: ``(adapt_x, adapt_y, heldout_x, heldout_y)``.
Split = tuple[Tensor, Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One candidate pattern: where it came from, and the pattern or why it is invalid."""

    text: str  # as written (user) or generated; the canonical form when valid
    origin: str  # "full", "top-k", "full-m+top-k" or "user"
    pattern: Pattern | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.pattern is not None


def group_steps(pattern: Pattern) -> int:
    """How many (group, step) updates a pattern performs: the tie-breaker of the rule (less work)."""
    return sum(sum(row) for row in pattern.rows)


def split_candidates(text: str | Sequence[str]) -> list[str]:
    """User candidates from a config string (``"0001x5, 1111|0001x4"``) or a list of strings.

    Patterns never contain commas or spaces, so both separate candidates.
    """
    items = [text] if isinstance(text, str) else list(text)
    return [part for item in items for part in item.replace(",", " ").split()]


def family_patterns(num_groups: int, steps: int, *, max_top_k: int = 0,
                    full_steps: Sequence[int] = (1,)) -> list[tuple[Pattern, str]]:
    """The structured family for a model with ``num_groups`` groups and ``steps`` steps.

    ``full`` first; then the top ``k`` groups at every step (``k = 1`` is ANIL) for ``k = 1 ..
    max_top_k`` (0 = up to ``num_groups - 1``); then, for each ``m`` in ``full_steps`` with
    ``0 < m < steps``, ``m`` full steps followed by top-``k`` steps; then ``m`` top-``K`` steps
    followed by top-``k`` steps for ``k < K < num_groups`` (deep first, shallow later: one deep
    step fixes the lower groups for the task, and the cheap steps after it reuse the cached prefix).
    """
    if num_groups < 1 or steps < 1:
        raise ValueError(f"a pattern family needs at least one group and one step "
                         f"(got {num_groups} groups, {steps} steps)")
    top = num_groups - 1 if max_top_k <= 0 else min(max_top_k, num_groups - 1)
    out = [(Pattern.full(num_groups, steps), "full")]
    for k in range(1, top + 1):
        out.append((Pattern.top(num_groups, k, steps), "top-k"))
    for m in sorted(set(full_steps)):
        if not 0 < m < steps:
            continue
        for deep in range(num_groups, 1, -1):
            origin = "full-m+top-k" if deep == num_groups else "top-K-m+top-k"
            head = Pattern.top(num_groups, deep, m).rows
            for k in range(1, min(top, deep - 1) + 1):
                out.append((Pattern(head + Pattern.top(num_groups, k, steps - m).rows), origin))
    return out


def build_candidates(group_names: Sequence[str], steps: int, *, model_name: str = "model",
                     family: bool = True, max_top_k: int = 0, full_steps: Sequence[int] = (1,),
                     user: str | Sequence[str] = ()) -> list[Candidate]:
    """Full pattern first, then the family (if ``family``), then the user's patterns.

    User patterns may use aliases (``head``, ``body``...; they expand with ``steps`` steps) and may
    have another number of steps. Duplicates (same canonical pattern) are kept once, at their first
    position; invalid user patterns become candidates with ``error`` set.
    """
    generated = family_patterns(len(group_names), steps, max_top_k=max_top_k, full_steps=full_steps)
    if not family:
        generated = generated[:1]
    out: list[Candidate] = []
    seen: set[str] = set()
    for p, origin in generated:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(Candidate(str(p), origin, p))
    for text in split_candidates(user):
        try:
            p = resolve_pattern(text, group_names, steps, model_name)
        except PatternError as e:
            out.append(Candidate(text, "user", None, str(e)))
            continue
        if str(p) not in seen:
            seen.add(str(p))
            out.append(Candidate(str(p), "user", p))
    return out


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def adaptation_runner(model: StagedModel, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                      pattern: Pattern, alpha: float, *, second_order: bool = False,
                      cache_prefix: bool = True) -> Callable[[], Any]:
    """A zero-argument function doing one adaptation the way training or evaluation does it.

    First order: :func:`adapt` (no graph). Second order: the differentiable adaptation *and* the
    backward pass through it (``J_A(w)^T v``), which is what a second-order meta-step pays per task;
    ``v`` is fixed up front (its value does not change the cost).
    """
    w = detach(params)
    if not second_order:
        return lambda: adapt(model, w, x, y, loss_fn, pattern, alpha, cache_prefix=cache_prefix)
    v, _ = loss_grad(model, w, x, y, loss_fn)

    def run() -> Params:
        _, vjp = adapt_with_vjp(model, w, x, y, loss_fn, pattern, alpha, cache_prefix)
        return vjp(v)
    return run


def median_times_ms(runners: Sequence[Callable[[], Any]], *, warmup: int = 2,
                    repeats: int = 5) -> list[float]:
    """Median wall time (ms) of each runner after ``warmup`` untimed calls.

    The runners are timed in interleaved rounds (each round times every runner once), so a change of
    machine load during the measurement affects all candidates alike instead of biasing the ones
    measured last.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for run in runners:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            run()
            samples[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(s) for s in samples]


def time_adaptation(model: StagedModel, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                    pattern: Pattern, alpha: float, *, second_order: bool = False,
                    cache_prefix: bool = True, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time (ms) of one adaptation of ``params`` on ``(x, y)`` with ``pattern``."""
    run = adaptation_runner(model, params, x, y, loss_fn, pattern, alpha,
                            second_order=second_order, cache_prefix=cache_prefix)
    return median_times_ms([run], warmup=warmup, repeats=repeats)[0]


def machine_info() -> dict[str, Any]:
    """What a timing depends on: torch threads, CPUs, load average (timings are only comparable
    with these)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on every platform
        load = []
    return {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg": load,
            "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------
# Measurement on tasks
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """Candidates measured on some tasks (one client, or several merged).

    ``quality`` is accuracy (a fraction in [0, 1]) for classification and the loss for regression;
    both are example-weighted means over the tasks' held-out examples. ``ms`` is the median
    adaptation time. Lists follow the candidate order.
    """

    patterns: tuple[str, ...]
    metric: str  # "accuracy" or "loss"
    quality: tuple[float, ...]
    loss: tuple[float, ...]
    ms: tuple[float, ...]
    examples: int
    sources: int = 1  # how many measurements (clients) were merged into this one


def measure_candidates(model: StagedModel, params: Params, loss_fn: LossFn, splits: Sequence[Split],
                       patterns: Sequence[Pattern], alpha: float, classification: bool, *,
                       warmup: int = 2, repeats: int = 5, cache_prefix: bool = True,
                       timed_splits: int = 1) -> Measurement:
    """Quality of each pattern on ``splits`` and its median adaptation time on the first
    ``timed_splits`` splits' adaptation data (the median over their per-split medians; with
    ``timed_splits = 0`` nothing is timed and the times are NaN)."""
    if not splits:
        raise ValueError("measure_candidates needs at least one task")
    weights = [len(s[3]) for s in splits]
    total = sum(weights)
    quality, loss = [], []
    for p in patterns:
        q = l = 0.0
        for (ax, ay, hx, hy), wt in zip(splits, weights):
            m = personalized_metrics(model, loss_fn, params, ax, ay, hx, hy, p, alpha, classification)
            q += float(m["accuracy" if classification else "loss"]) * wt
            l += float(m["loss"]) * wt
        quality.append(q / total)
        loss.append(l / total)
    per_split = []
    for ax, ay, *_ in splits[:timed_splits]:
        runners = [adaptation_runner(model, params, ax, ay, loss_fn, p, alpha,
                                     cache_prefix=cache_prefix) for p in patterns]
        per_split.append(median_times_ms(runners, warmup=warmup, repeats=repeats))
    ms = ([statistics.median(col) for col in zip(*per_split)] if per_split
          else [math.nan] * len(patterns))
    return Measurement(tuple(str(p) for p in patterns), "accuracy" if classification else "loss",
                       tuple(quality), tuple(loss), tuple(ms), total)


def combine_measurements(parts: Sequence[Measurement]) -> Measurement:
    """Merge clients' measurements: example-weighted quality and loss, median of the times."""
    if not parts:
        raise ValueError("no measurements to combine")
    first = parts[0]
    for p in parts[1:]:
        if p.patterns != first.patterns or p.metric != first.metric:
            raise ValueError("measurements of different candidate lists cannot be combined")
    total = sum(p.examples for p in parts)
    if total <= 0:
        raise ValueError("measurements hold no examples")

    def weighted(attr: str) -> tuple[float, ...]:
        cols = zip(*(getattr(p, attr) for p in parts))
        return tuple(sum(v * p.examples for v, p in zip(col, parts)) / total for col in cols)

    ms = tuple(statistics.median(col) for col in zip(*(p.ms for p in parts)))
    return Measurement(first.patterns, first.metric, weighted("quality"), weighted("loss"), ms,
                       total, sum(p.sources for p in parts))


# --------------------------------------------------------------------------------------------------
# The selection rule
# --------------------------------------------------------------------------------------------------

def resolve_unit(unit: str, classification: bool) -> str:
    """``auto`` -> accuracy points (classification) or loss percent (regression)."""
    if unit == "auto":
        return "accuracy_points" if classification else "loss_percent"
    if unit not in EPSILON_UNITS:
        raise ValueError(f"unknown epsilon unit {unit!r}; allowed: auto, {', '.join(EPSILON_UNITS)}")
    return unit


def change_vs_full(value: float, full: float, unit: str) -> float:
    """A candidate's change against the full pattern, in ``unit``: accuracy points (candidate minus
    full, x100; negative = worse) or loss percent (relative increase; positive = worse)."""
    if unit == "accuracy_points":
        return (value - full) * 100.0
    return (value / full - 1.0) * 100.0 if full != 0 else (0.0 if value == 0 else math.inf)


# Accumulated float error in means of 0/1 accuracies must not turn "exactly epsilon worse" into "not
# within epsilon".
_SLACK = 1e-9


def within_epsilon(value: float, full: float, epsilon: float, unit: str) -> bool:
    """Whether a candidate's quality (accuracy or loss, per ``unit``) is within ``epsilon`` of full."""
    if not (math.isfinite(value) and math.isfinite(full)):
        return False
    if unit == "accuracy_points":
        return value >= full - epsilon / 100.0 - _SLACK
    return value <= full * (1.0 + epsilon / 100.0) + _SLACK * max(1.0, abs(full))


@dataclass(frozen=True)
class Selection:
    """The rule's outcome: the chosen pattern, why, and one row per candidate."""

    chosen: str
    full: str
    epsilon: float
    unit: str
    reason: str
    rows: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def chose_full(self) -> bool:
        return self.chosen == self.full

    def row(self, pattern: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["pattern"] == pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "full": self.full, "epsilon": self.epsilon,
                "epsilon_unit": self.unit, "reason": self.reason, "rows": [dict(r) for r in self.rows]}


def select_pattern(measurement: Measurement, full: str, epsilon: float, unit: str, *,
                   time_tolerance: float = 0.0, invalid: Sequence[Candidate] = ()) -> Selection:
    """The fastest candidate whose quality is within ``epsilon`` of the full pattern's.

    Ties: candidates whose time is within ``time_tolerance`` (relative) of the fastest qualifying
    time are tied; among them the one with the fewest adapted (group, step) pairs wins, then the
    lexicographically smallest canonical text. The full pattern always qualifies, so when no other
    candidate is within epsilon the full pattern is chosen and ``reason`` says so. ``invalid``
    candidates are listed in the rows with their error and never chosen.
    """
    if unit not in EPSILON_UNITS:
        raise ValueError(f"unknown epsilon unit {unit!r}; allowed: {', '.join(EPSILON_UNITS)}")
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if full not in measurement.patterns:
        raise ValueError(f"the full pattern {full!r} was not measured; it is the reference")
    i_full = measurement.patterns.index(full)
    q_full, t_full = measurement.quality[i_full], measurement.ms[i_full]
    rows = []
    for text, q, loss, ms in zip(measurement.patterns, measurement.quality, measurement.loss,
                                 measurement.ms):
        ok = text == full or within_epsilon(q, q_full, epsilon, unit)
        rows.append({"pattern": text, "group_steps": group_steps(Pattern.parse(text)),
                     "ms": ms, measurement.metric: q,
                     **({"loss": loss} if measurement.metric != "loss" else {}),
                     "change": change_vs_full(q, q_full, unit) if math.isfinite(q) else None,
                     "speedup": t_full / ms if ms > 0 else math.inf,
                     "qualifies": ok})
    for c in invalid:
        rows.append({"pattern": c.text, "error": c.error, "qualifies": False})

    qualifying = [r for r in rows if r["qualifies"]]
    fastest = min(r["ms"] for r in qualifying)
    tied = [r for r in qualifying if r["ms"] <= fastest * (1.0 + time_tolerance)]
    chosen = min(tied, key=lambda r: (r["group_steps"], r["pattern"]))["pattern"]
    if not math.isfinite(q_full):
        reason = "the full pattern's quality is not finite, so nothing can be compared with it"
        chosen = full
    elif len(measurement.patterns) == 1:  # nothing measured beside it: no epsilon was applied
        reason = only_full_reason(invalid)
    elif len(qualifying) == 1:
        reason = f"no candidate other than the full pattern is within epsilon = {epsilon:g} ({unit})"
    elif chosen == full:
        reason = (f"candidates within epsilon = {epsilon:g} ({unit}) exist, but none is faster than "
                  "the full pattern")
    else:
        row = next(r for r in rows if r["pattern"] == chosen)
        reason = (f"fastest candidate within epsilon = {epsilon:g} ({unit}): "
                  f"{row['speedup']:.2f}x faster than full, change {row['change']:+.2f}")
    return Selection(chosen, full, epsilon, unit, reason, tuple(rows))


def only_full_reason(invalid: Sequence[Candidate]) -> str:
    """Why only the full pattern is left to choose: every other candidate invalid (each named with
    why it was refused), or none given."""
    if not invalid:
        return "the full pattern is the only candidate"
    refused = "; ".join(f"{c.text!r}: {c.error}" for c in invalid)
    return f"no candidate other than the full pattern was valid ({refused})"


# --------------------------------------------------------------------------------------------------
# Which clients validate and which test
# --------------------------------------------------------------------------------------------------

def validation_and_test_clients(num_clients: int, num_unseen: int, validation: int, test: int,
                                seed: int) -> tuple[list[int], list[int]]:
    """Disjoint client ids for selection (validation) and for reporting (test).

    Validation: a seeded sample of ``validation`` training clients (0 = all), measured on their
    held-out split, which training never uses. Test: the unseen clients ``num_clients ..`` (the first
    ``test`` of them, 0 = all), which never train; with no unseen clients, a seeded sample of the
    training clients that were not picked for validation (possibly empty).
    """
    rng = np.random.default_rng([seed, 0x5E1EC7])
    order = [int(c) for c in rng.permutation(num_clients)]
    n_val = num_clients if validation <= 0 else min(validation, num_clients)
    val = sorted(order[:n_val])
    if num_unseen > 0:
        n_test = num_unseen if test <= 0 else min(test, num_unseen)
        return val, [num_clients + j for j in range(n_test)]
    rest = order[n_val:]
    n_test = len(rest) if test <= 0 else min(test, len(rest))
    return val, sorted(rest[:n_test])


def _num(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4g}"


def format_table(selection: Selection, metric: str, test: dict[str, float] | None = None) -> str:
    """The selection as a fixed-width text table (what the CLI prints)."""
    unit = "pts" if selection.unit == "accuracy_points" else "%"
    scale = 100.0 if metric == "accuracy" else 1.0
    qname = "acc %" if metric == "accuracy" else "loss"
    head = f"{'pattern':<28}{'ms':>9}{'speedup':>9}{'val ' + qname:>11}{'change ' + unit:>12}"
    if test:
        head += f"{'test ' + qname:>12}"
    lines = [head, "-" * len(head)]
    for r in selection.rows:
        if "error" in r:
            lines.append(f"{r['pattern']:<28}  invalid: {r['error']}")
            continue
        mark = " <- chosen" if r["pattern"] == selection.chosen else ("" if r["qualifies"] else " x")
        change = "-" if r["change"] is None else f"{round(r['change'], 2) + 0.0:+.2f}"  # no -0.00
        line = (f"{r['pattern']:<28}{r['ms']:>9.3f}{r['speedup']:>8.2f}x"
                f"{_num(r[metric] * scale):>11}{change:>12}")
        if test:
            t = test.get(r["pattern"])
            line += f"{_num(t * scale):>12}" if t is not None else f"{'-':>12}"
        lines.append(line + mark)
    lines.append(f"chosen: {selection.chosen} ({selection.reason})")
    return "\n".join(lines)
