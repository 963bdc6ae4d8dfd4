"""The tuning report: ``report.md`` (a table per setting), ``report.json`` (every candidate with its
runs' curves) and a figure of the search per setting (the candidates in the space, and their
validation curves with the rungs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmaml.atomic import atomic_write_text
from fedmaml.config import short_key
from fedmaml.provenance import with_provenance
from fedmaml.tune.metric import ids_text
from fedmaml.tune.selection import Candidate

REPORT = "report.md"
REPORT_JSON = "report.json"


def validation_note(tuner: Any) -> str:
    """What the metric is measured on, in words, with the warning that applies (docs/tuning.md)."""
    m, base = tuner.spec.metric, tuner.base
    group = m.key.split(".")[0]
    clients = f" (clients {ids_text(m.clients)})" if m.clients else ""
    text = (f"`{m.label}` ({'lower' if m.direction == 'min' else 'higher'} is better), on the "
            f"{group} clients{clients} of the tuning seeds {','.join(map(str, tuner.spec.seeds))}.")
    if group == "unseen" and base.data.family == "sinusoid_grid" and not m.clients:
        text += (" WARNING: sinusoid_grid's unseen clients are the same fixed test tasks for "
                 "every seed; if the final table reports them, this is selection on the test set. "
                 "Evaluate more unseen clients while tuning (data.unseen_clients) and measure on "
                 "the ones the table does not report (--metric unseen.loss@IDS).")
    elif group == "unseen" and base.seed in tuner.spec.seeds:
        text += (f" Note: the config's own seed ({base.seed}) is a tuning seed; for seeded "
                 "families its unseen clients are the draw a run of that seed reports.")
    elif group == "seen":
        text += (" The seen panel holds training clients (evaluated on their held-out "
                 "examples): a validation set disjoint from unseen test clients.")
    return text


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.4g}"


def _row(c: Candidate, keys: list[str], chosen: bool) -> str:
    values = [str(c.params.get(k, "-")) for k in keys]
    finals = " / ".join(_fmt(r.final) if r.status == "completed" else r.status for r in c.runs)
    reached = max((r.rounds for r in c.runs), default=0)
    status = "**chosen**" if chosen else (c.excluded or "eligible")
    return (f"| {c.id} | " + " | ".join(values) + f" | {_fmt(c.score)} | {_fmt(c.spread)} | "
            f"{finals or '-'} | {reached} | {_fmt(c.rise)} | {status} |")


def setting_markdown(tuner: Any, s: Any) -> str:
    keys = tuner.spec.space.keys
    ch = s.choice
    title = f"## Setting {s.setting}" if s.setting else "## Result"
    lines = [title, "", ch.describe() + ".", ""]
    if ch.chosen is not None:
        lines += [f"- chosen: mean {_fmt(ch.chosen.score)} ± {_fmt(ch.chosen.spread)} (std over "
                  f"{len(ch.chosen.runs)} seeds)"]
        if ch.runner_up is not None:
            rel = ch.margin / abs(ch.chosen.score) if ch.chosen.score else math.nan
            lines += [f"- margin to the runner-up: {_fmt(ch.margin)} ({100 * rel:.2g} %)"
                      + ("; within the seeds' spread" if ch.within_noise else "")]
        else:
            lines += ["- no runner-up: only one candidate is eligible"]
        if ch.edges:
            lines += ["- **at the edge of the space**: " + ", ".join(
                f"{short_key(k)} at its {e} end" for k, e in ch.edges.items())
                + "; the best value may lie outside: widen the space"]
        if s.tuned_path is not None:
            lines += [f"- tuned config: `{s.tuned_path.name}` (`fedmaml run {s.tuned_path.name}`)"]
    lines += [f"- rungs (rounds): {', '.join(map(str, s.rungs))}; run-rounds trained: "
              f"{s.rounds_trained:,} of {len(ch.ranked) * len(tuner.spec.seeds) * tuner.budget:,} "
              "for every candidate at the full budget", ""]
    lines += ["| id | " + " | ".join(short_key(k) for k in keys) + " | mean | std | final per "
              "seed | rounds | late rise | status |",
              "|" + "---|" * (len(keys) + 7)]
    for c in ch.ranked:
        lines.append(_row(c, keys, c is ch.chosen))
    if s.figure is not None:
        lines += ["", f"![the search]({s.figure.name})"]
    return "\n".join(lines)


def write_report(tuner: Any, result: Any) -> Path:
    """Write report.md, report.json and the figures; return report.md's path."""
    spec = tuner.spec
    for s in result.settings:
        name = f"search-{s.setting}.png" if s.setting else "search.png"
        s.figure = plot_search(tuner, s, tuner.dir / name)
    head = [f"# Tuning report: {tuner.base.name}", "",
            f"- search: {spec.search}" + (f", {spec.trials} candidates" if spec.trials else "")
            + (f" in batches of {spec.batch}" if spec.batch else "")
            + (f"; successive halving, {spec.rungs} rungs, keep 1/{spec.reduction:g}"
               if spec.rungs > 1 else ""),
            "- space: " + ", ".join(f"{short_key(d.key)} = {d.describe()}"
                                    for d in spec.space.dims),
            f"- validation metric: {validation_note(tuner)}",
            f"- budget per run: {tuner.budget} rounds; every candidate runs on seeds "
            f"{','.join(map(str, spec.seeds))}",
            f"- selection (docs/tuning.md): a candidate that diverged or failed on any seed, or "
            f"whose final value is more than {spec.rise:g}x its best at or after half the budget "
            "on any seed, is not chosen; the best mean over seeds wins",
            f"- wall time: {result.seconds / 60:.1f} min (every invocation)", ""]
    text = "\n".join(head + [setting_markdown(tuner, s) + "\n" for s in result.settings])
    atomic_write_text(tuner.dir / REPORT, text)
    payload = {"tune_dir": str(tuner.dir), "spec": spec.to_json(), "budget": tuner.budget,
               "wall_seconds": result.seconds, "settings": [_setting_json(s)
                                                            for s in result.settings]}
    atomic_write_text(tuner.dir / REPORT_JSON,
                      json.dumps(with_provenance(payload), indent=1, default=str) + "\n")
    return tuner.dir / REPORT


def _candidate_json(c: Candidate) -> dict[str, Any]:
    return {"id": c.id, "params": c.params, "score": c.score, "spread": c.spread,
            "late_rise": c.rise, "excluded": c.excluded,
            "rungs": c.extra.get("rungs", {}),
            "runs": [{"seed": r.seed, "status": r.status, "rounds": r.rounds,
                      "final": r.final, "curve": r.curve} for r in c.runs]}


def _setting_json(s: Any) -> dict[str, Any]:
    ch = s.choice
    return {"setting": s.setting, "rungs": s.rungs, "rounds_trained": s.rounds_trained,
            "chosen": None if ch.chosen is None else ch.chosen.params,
            "chosen_id": None if ch.chosen is None else ch.chosen.id,
            "runner_up": None if ch.runner_up is None else ch.runner_up.params,
            "margin": ch.margin, "within_noise": ch.within_noise, "edges": ch.edges,
            "tuned_config": None if s.tuned_path is None else str(s.tuned_path),
            "candidates": [_candidate_json(c) for c in ch.ranked]}


def plot_search(tuner: Any, s: Any, path: Path) -> Path | None:
    """Left: the candidates in the space (the first two numeric keys; colour = mean score,
    x = excluded, star = chosen). Right: each candidate's validation curve (mean over seeds), the
    rungs as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ch = s.choice
    if not ch.ranked:
        return None
    dims = [d for d in tuner.spec.space.dims
            if d.kind != "choice" or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         for v in d.choices)][:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    scores = [c.score for c in ch.ranked if math.isfinite(c.score)]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    if dims:
        x_dim, y_dim = dims[0], (dims[1] if len(dims) > 1 else None)
        for c in ch.ranked:
            x = c.params[x_dim.key]
            y = c.params[y_dim.key] if y_dim else (c.score if math.isfinite(c.score) else hi)
            if c is ch.chosen:
                left.scatter([x], [y], marker="*", s=260, c="gold", edgecolors="k", zorder=3)
            elif c.excluded is not None:
                left.scatter([x], [y], marker="x", c="grey")
            else:
                left.scatter([x], [y], c=[c.score], vmin=lo, vmax=hi, cmap="viridis_r"
                             if tuner.spec.metric.direction == "min" else "viridis")
        left.set_xlabel(short_key(x_dim.key))
        left.set_ylabel(short_key(y_dim.key) if y_dim else tuner.spec.metric.label)
        if x_dim.kind == "log" or _log_choices(x_dim):
            left.set_xscale("log")
        if y_dim is not None and (y_dim.kind == "log" or _log_choices(y_dim)):
            left.set_yscale("log")
        left.set_title("candidates (star: chosen, x: not eligible)")
    for c in ch.ranked:
        runs = [r for r in c.runs if r.curve]
        if not runs:
            continue
        n = min(len(r.curve) for r in runs)
        xs = [p[0] for p in runs[0].curve[:n]]
        ys = [sum(r.curve[i][1] for r in runs) / len(runs) for i in range(n)]
        style = dict(lw=2.5, c="k", zorder=3) if c is ch.chosen else dict(lw=0.8, alpha=0.6)
        right.plot(xs, ys, **style)
    for r in s.rungs[:-1]:
        right.axvline(r, ls="--", c="grey", lw=0.8)
    right.set_xlabel("round")
    right.set_ylabel(tuner.spec.metric.label + " (mean over seeds)")
    if tuner.spec.metric.direction == "min" and scores and lo > 0:
        right.set_yscale("log")
    right.set_title("validation curves (black: chosen; dashed: rungs)")
    fig.suptitle(f"{tuner.base.name}" + (f", {s.setting}" if s.setting else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_choices(d: Any) -> bool:
    if d.kind != "choice":
        return False
    v = [float(x) for x in d.choices]
    return min(v) > 0 and max(v) / min(v) >= 20
