"""The Markdown report of ``fedmaml compare``: one table row per setting (final and best metric,
rounds and samples to a target, wall time, bytes communicated; mean ± std over seeds), what the
settings share and how they differ, the figures, and notes on anything left out."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from fedmaml.config import config_to_flat, short_key
from fedmaml.results.compare import Comparison, Stat, describe_metric
from fedmaml.results.wording import counted

REPORT_FILE = "report.md"
# Shared keys worth stating in the report (the rest is in each run's config.yaml).
_CONTEXT_KEYS = ("algorithm.name", "data.family", "data.num_clients", "data.unseen_clients",
                 "federated.mode", "federated.rounds", "federated.eval_every", "engine.name")


def _num(x: float, digits: int = 4) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}g}"


def fmt_stat(stat: Stat, digits: int = 4) -> str:
    """``0.5123 ± 0.021`` (no ± for a single run)."""
    if math.isnan(stat.mean):
        return "-"
    std = stat.std
    return _num(stat.mean, digits) + ("" if math.isnan(std) else f" ± {_num(std, 2)}")


def _yaml_text(value: object) -> str:
    """A config value as a YAML file writes it (``false``, not Python's ``False``)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _references(c: Comparison) -> list[str]:
    """The text of the reference shown beside each setting (``sweep.references``: a number reported
    elsewhere for the compared metric), or ""."""
    return [r.text if r else "" for r in c.references]


def markdown_table(c: Comparison) -> str:
    refs = _references(c)
    ref_head, ref_rule = (" Reference |", "---|") if any(refs) else ("", "")
    head = ("| Setting | Runs | Before training | Final | Best | Rounds to target | Samples to target "
            f"| Wall time (s) | Communicated |{ref_head}\n"
            f"|---|---:|---:|---:|---:|---:|---:|---:|---:|{ref_rule}\n")
    rows = []
    for setting, st in zip(c.settings, c.stats):
        if math.isnan(st.rounds_to_target):
            rounds = samples = "not reached"
        else:
            rounds, samples = f"{st.rounds_to_target:,.0f}", f"{st.samples_to_target:,.0f}"
        runs = f"{st.runs}" + (f" (+{setting.incomplete_text()})" if setting.incomplete else "")
        ref = f" {refs[len(rows)] or '-'} |" if ref_head else ""
        rows.append(f"| {setting.label} | {runs} | {fmt_stat(st.before)} | {fmt_stat(st.final)} | "
                    f"{fmt_stat(st.best)} | {rounds} | {samples} | "
                    f"{fmt_stat(st.seconds, 3)}{' *' if st.batched else ''} | "
                    f"{fmt_bytes(st.bytes.mean)} |{ref}")
    return head + "\n".join(rows) + "\n"


def table_legend(c: Comparison) -> str:
    """One line per column of :func:`markdown_table`, for a reader who has not read the docs."""
    what = describe_metric(c.metric.key)
    better = "higher" if c.metric.higher_is_better else "lower"
    lines = [
        f"Columns ({what}; {better} is better; mean ± std over the seeds of a setting):",
        "  Setting: the sweep's name for the setting, or the config values in which the settings "
        "differ",
        "  Runs: completed runs (seeds) averaged; runs that diverged or failed are counted in "
        "brackets and left out",
        "  Before training: the metric at round 0 (the initial model, adapted as at every "
        "evaluation); - where the metric has no value at round 0 (memories and training losses "
        "start with training)",
        "  Final: at the last evaluation; Best: the best evaluation of each run, round 0 included",
        f"  Rounds / Samples to target: first evaluation where the seed-mean reaches "
        f"{_num(c.target)} (the least good final mean unless --target is given); samples = "
        "training examples drawn by then",
        "  Wall time: a run's total seconds (summary.json; marked *: its share of a vectorized "
        "batch, the batch's time divided by its runs); Communicated: bytes of all training "
        "messages, both ways",
    ]
    if any(st.seconds.shared for st in c.stats):
        lines[-1] += ("; * without ±: all of the setting's runs shared one batch, so its time was "
                      "measured once and has no spread over seeds")
    if any(_references(c)):
        lines.append(f"  Reference: a value of {c.metric.key} reported elsewhere for the same "
                     "setting, with its budget and source (the sweep's `references`)")
    lines += [f"  Reference note: {n}" for n in c.reference_notes]
    patterns = sorted({str(s.config.evaluation.pattern) for s in c.settings})
    selected = any(s.config.pattern_selection.mode != "none"
                   and "evaluation" in s.config.pattern_selection.apply_to for s in c.settings)
    lines.append(f"  Evaluation adapts with Lambda pattern {', '.join(patterns)} (evaluation.pattern)"
                 + ("; runs with pattern_selection switch the evaluation to the selected pattern "
                    "after it is chosen, so Before and Final may use different patterns (see each "
                    "run's pattern_selection.json)" if selected else " in every column"))
    return "\n".join(lines) + "\n"


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()


def write_report(c: Comparison, out: Path, figures: Sequence[Path], xs: Sequence[str],
                 band: str, paths: Sequence[str | Path], tables: Sequence[Path] = ()) -> Path:
    """``report.md`` in ``out``; figures, table files and runs are linked relative to it."""
    better = "higher" if c.metric.higher_is_better else "lower"
    compare_word = "≥" if c.metric.higher_is_better else "≤"
    n_runs = sum(len(s.runs) for s in c.settings)
    lines = [f"# Comparison: {describe_metric(c.metric.key)}", "",
             f"{counted(n_runs, 'run')} in {counted(len(c.settings), 'setting')}, from "
             + ", ".join(f"`{p}`" for p in paths) + ". "
             f"Metric `{c.metric.key}` ({better} is better). Numbers are the mean ± sample standard "
             "deviation over the completed runs (seeds) of a setting; runs that diverged or failed are "
             "counted in the Runs column and left out of the numbers.", "", markdown_table(c).rstrip(), "",
             "```", table_legend(c).rstrip(), "```", ""]
    if tables:
        lines += ["The table at full precision and for a paper: "
                  + ", ".join(f"[{t.name}]({_rel(t, out)})" for t in tables) + ".", ""]

    differ = list(c.settings[0].values) if c.settings else []
    flat = config_to_flat(c.settings[0].config)
    shared = [f"{short_key(k)} = {flat[k]}" for k in _CONTEXT_KEYS if k not in differ]
    if differ:
        lines.append("- **Settings** differ in " + ", ".join(f"`{k}`" for k in differ)
                     + "; they share " + ", ".join(shared) + ".")
    else:
        lines.append("- **One setting**: " + ", ".join(shared) + ".")
    for s in c.settings:
        if s.named:
            sets = ", ".join(f"`{k}={_yaml_text(v)}`" for k, v in s.named.overrides.items())
            lines.append(f"- **{s.named.name}** (a named setting of the sweep) sets "
                         f"{sets or 'nothing (the base config)'}.")
    target_how = ("the least good final mean among the settings; `--target` sets another"
                  if c.target_is_default else "given with `--target`")
    lines += [
        f"- **Target** {_num(c.target)} ({target_how}). Rounds to target is the first evaluated "
        f"round at which the mean over seeds is {compare_word} the target (the line of the "
        "convergence figure), so it is resolved to the evaluation interval "
        "(`federated.eval_every`); samples to target are the training samples processed by then.",
        "- **Final** is each run's last evaluation; **best** its best evaluation, round 0 "
        "(before training) included.",
        "- **Wall time** is a run's total time (`summary.json`); for runs trained together in a "
        "vectorized batch (marked *) the batch's time divided by its runs. **Communicated**: the "
        "bytes of all training messages, server to clients and back (mean over seeds).",
        ""]

    lines += ["## Figures", ""]
    for fig in figures:
        if fig.suffix == ".png":
            lines += [f"![{fig.stem}]({_rel(fig, out)})", ""]
    others = [f for f in figures if f.suffix != ".png"]
    if others:
        lines += ["Also: " + ", ".join(f"[{f.name}]({_rel(f, out)})" for f in others), ""]
    lines += [f"Convergence: mean over seeds against {', '.join(xs)}, shaded "
              f"{dict(std='±1 std', sem='±1 standard error', minmax='min to max')[band]} over "
              "seeds. Clients: the personalized metric of every evaluated client at each run's "
              "final evaluation, seeds pooled.", ""]

    lines += ["## Runs", ""]
    for setting in c.settings:
        dirs = ", ".join([f"[{r.dir.name}]({_rel(r.dir, out)})" for r in setting.runs]
                         + [f"[{r.dir.name}]({_rel(r.dir, out)}) ({r.status}: left out)"
                            for r in setting.incomplete])
        lines.append(f"- {setting.label}: {dirs}")
    lines.append("")
    if c.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in c.notes] + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
