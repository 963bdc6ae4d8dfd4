"""The table of ``fedmaml compare`` in machine- and paper-ready forms: CSV and JSON at full precision,
and a LaTeX (booktabs) tabular.

Every format renders the same :class:`~fedmaml.results.compare.Comparison`, computed once; CSV and
JSON both write :func:`table_records` (one record per setting), so they hold the same numbers. The
Markdown table of the report and the terminal is compare_report.py's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmaml.results.compare import Comparison, Stat, describe_metric
from fedmaml.results.compare_report import fmt_bytes

#: ``--table-format``: the files written beside the report, ``table-<metric>.<format>``.
TABLE_FORMATS = ("csv", "tex", "json")


def table_path(c: Comparison, out: Path, fmt: str) -> Path:
    return out / f"table-{c.metric.key}.{fmt}"


def write_tables(c: Comparison, out: Path, formats: Sequence[str]) -> list[Path]:
    """``table-<metric>.<fmt>`` in ``out`` for each format (csv, tex, json), in the order given."""
    render = {"csv": table_csv, "tex": table_latex, "json": table_json}
    paths = []
    for fmt in dict.fromkeys(formats):
        path = table_path(c, out, fmt)
        path.write_text(render[fmt](c), encoding="utf-8")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# The records: one per setting, full precision (CSV and JSON)
# --------------------------------------------------------------------------------------------------

def _number(x: float) -> float | None:
    """A float as JSON can hold it: NaN (no value) becomes None."""
    return None if math.isnan(x) else float(x)


def _stat(stat: Stat) -> dict[str, Any]:
    """Mean, sample std (None for one value, or a shared measurement), the number of values
    behind them, and the per-seed values."""
    return {"mean": _number(stat.mean), "std": _number(stat.std), "n": stat.n,
            "values": [_number(v) for v in stat.values]}


def table_records(c: Comparison) -> list[dict[str, Any]]:
    """One record per setting, in the table's order, with every number of its row at full
    precision: ``setting`` (its label), ``name`` (the sweep's named setting, or None), ``values``
    (the config keys in which the settings differ), ``runs`` and ``seeds`` (the completed runs
    averaged), ``incomplete`` (runs that diverged or failed, left out), ``rounds``
    (``federated.rounds``), ``before``/``final``/``best``/``seconds``/``bytes``/``samples`` (each
    ``mean``, ``std``, ``n`` and the per-seed ``values``; ``seconds`` adds ``batched_runs`` and
    ``shared``: one batch's time, with no spread over seeds), ``rounds_to_target`` and
    ``samples_to_target`` (None: not reached), and ``reference`` (shown for this metric, or None)."""
    records = []
    for setting, st, ref in zip(c.settings, c.stats, c.references):
        rounds = int(setting.config.federated.rounds)
        records.append({
            "setting": setting.label,
            "name": setting.named.name if setting.named else None,
            "values": dict(setting.values),
            "runs": st.runs,
            "seeds": [r.seed for r in setting.runs],
            "incomplete": [{"seed": r.seed, "status": r.status} for r in setting.incomplete],
            "rounds": rounds,
            "before": _stat(st.before),
            "final": _stat(st.final),
            "best": _stat(st.best),
            "rounds_to_target": _number(st.rounds_to_target),
            "samples_to_target": _number(st.samples_to_target),
            "seconds": {**_stat(st.seconds), "batched_runs": st.batched,
                        "shared": st.seconds.shared},
            "bytes": _stat(st.bytes),
            "samples": _stat(st.samples),
            "reference": None if ref is None else {
                "text": ref.text, "metric": ref.metric, "rounds": list(ref.rounds),
                "same_budget": (rounds in ref.rounds) if ref.rounds else None},
        })
    return records


def table_json(c: Comparison) -> str:
    """The comparison's table as JSON: what was compared (metric, target), the records of
    :func:`table_records`, and the notes. Numbers at full precision; no value is ``null``."""
    doc = {
        "metric": {"key": c.metric.key, "description": describe_metric(c.metric.key),
                   "higher_is_better": c.metric.higher_is_better, "task_metric": c.task_metric},
        "target": {"value": _number(c.target), "default": c.target_is_default},
        "statistics": "mean and sample standard deviation (ddof 1) over the completed runs "
                      "(seeds) of a setting",
        "settings": table_records(c),
        "notes": list(c.notes),
        "reference_notes": list(c.reference_notes),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _cell(value: Any) -> str:
    """A CSV cell: floats in full (shortest exact) form, booleans as true/false, no value empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in record.items():
        if key == "values" and not prefix:  # the config keys in which settings differ, as named
            out.update({k: json.dumps(list(v)) if isinstance(v, (list, tuple)) else _cell(v)
                        for k, v in value.items()})
        elif key == "incomplete":
            out[prefix + key] = "; ".join(f"seed {i['seed']} {i['status']}" for i in value)
        elif isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}_"))
        elif isinstance(value, list):
            out[prefix + key] = ";".join(_cell(v) for v in value)
        else:
            out[prefix + key] = _cell(value)
    return out


def table_csv(c: Comparison) -> str:
    """The comparison's table as CSV: a header, then one row per setting with the metric, the
    target and every field of :func:`table_records`, nested fields joined by ``_`` (``final_mean``,
    ``final_std``, ``final_n``, ``final_values``: the per-seed values joined by ``;``). Floats in
    full precision; an empty cell is no value (a std of one run, a target not reached)."""
    none = {"text": None, "metric": None, "rounds": None, "same_budget": None}
    # A setting without a reference (for this metric) has empty reference cells: every file has
    # the same columns, whatever the metric compared.
    rows = [{"metric": c.metric.key, "target": _cell(_number(c.target)),
             **_flat({**r, "reference": r["reference"] or none})} for r in table_records(c)]
    header = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# LaTeX
# --------------------------------------------------------------------------------------------------

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "≥": r"$\geq$",
                "≤": r"$\leq$"}


def tex_escape(text: str) -> str:
    """Text as LaTeX typesets it literally (``beta=0.3, lr_decay`` -> ``beta=0.3, lr\\_decay``)."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_number(x: float, digits: int = 4) -> str:
    """``x`` to ``digits`` significant figures, in math mode's terms (``1.2 \\times 10^{5}``)."""
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return rf"{mantissa} \times 10^{{{int(exponent)}}}"
    return text


def tex_stat(stat: Stat, bold: bool = False, mark: str = "") -> str:
    """``$1.322 \\pm 0.0031$``: the std to 2 significant figures and the mean to the same decimal
    place (4 significant figures without a std); ``--`` for no value; ``bold``: the mean in bold;
    ``mark``: a superscript after the mean (``*``)."""
    mean, std = stat.mean, stat.std
    if math.isnan(mean):
        return "--"
    if math.isnan(std) or std == 0:
        head, tail = _tex_number(mean), ("" if math.isnan(std) else r" \pm 0")
    else:
        decimals = max(0, 1 - math.floor(math.log10(std)))
        head, tail = f"{mean:.{decimals}f}", rf" \pm {std:.{decimals}f}"
    if bold:
        head = rf"\mathbf{{{head}}}"
    if mark:
        head += f"^{{{mark}}}"
    return f"${head}{tail}$"


def _best(values: Sequence[float], higher_is_better: bool) -> set[int]:
    """The rows holding the best finite value of a column (ties all), when there is a choice."""
    finite = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
    if len(finite) < 2:
        return set()
    best = max(v for _, v in finite) if higher_is_better else min(v for _, v in finite)
    return {i for i, v in finite if v == best}


def table_latex(c: Comparison) -> str:
    """The comparison's table as a booktabs ``tabular`` (``\\usepackage{booktabs}``), the columns of
    the Markdown table, each statistic as ``mean \\pm std`` over seeds; the best mean of the Final
    and Best columns, and the fewest rounds and samples to target, in bold. Comment lines above it
    say what it shows, for the caption."""
    higher = c.metric.higher_is_better
    bold = {name: _best([getattr(st, name).mean for st in c.stats], higher)
            for name in ("final", "best")}
    bold["rounds"] = _best([st.rounds_to_target for st in c.stats], False)
    bold["samples"] = _best([st.samples_to_target for st in c.stats], False)
    refs = any(r is not None for r in c.references)
    head = ["Setting", "Runs", "Before training", "Final", "Best", "Rounds to target",
            "Samples to target", "Wall time (s)", "Communicated"] + (["Reference"] if refs else [])
    rows = []
    for i, (setting, st, ref) in enumerate(zip(c.settings, c.stats, c.references)):
        if math.isnan(st.rounds_to_target):
            rounds = samples = "not reached"
        else:
            rounds, samples = f"{st.rounds_to_target:,.0f}", f"{st.samples_to_target:,.0f}"
            if i in bold["rounds"]:
                rounds = rf"\textbf{{{rounds}}}"
            if i in bold["samples"]:
                samples = rf"\textbf{{{samples}}}"
        runs = f"{st.runs}" + (f" (+{setting.incomplete_text()})" if setting.incomplete else "")
        cells = [tex_escape(setting.label), tex_escape(runs), tex_stat(st.before),
                 tex_stat(st.final, i in bold["final"]), tex_stat(st.best, i in bold["best"]),
                 rounds, samples, tex_stat(st.seconds, mark="*" if st.batched else ""), tex_escape(fmt_bytes(st.bytes.mean)).replace(" ", r"\,")]
        if refs:
            cells.append(tex_escape(ref.text) if ref else "--")
        rows.append(" & ".join(cells) + r" \\")
    better = "higher" if higher else "lower"
    notes = [f"% fedmaml compare: {describe_metric(c.metric.key)} ({c.metric.key}); {better} is "
             "better.",
             "% mean \\pm sample std over the completed runs (seeds) of a setting; bold: the best "
             "mean of Final and Best, the fewest rounds and samples to target.",
             f"% Target: {c.target:.6g}"
             + (" (the least good final mean)." if c.target_is_default else " (--target).")]
    if any(st.batched for st in c.stats):
        notes.append("% Wall time: * a run's share of a vectorized batch (the batch's time / its "
                     "runs); without \\pm: one batch's time, shared by all of the setting's runs.")
    notes.append("% Needs \\usepackage{booktabs}.")
    notes += [f"% Reference note: {n}" for n in c.reference_notes]
    lines = [*notes,
             r"\begin{tabular}{l" + "r" * 8 + ("l" if refs else "") + "}",
             r"\toprule",
             " & ".join(head) + r" \\",
             r"\midrule",
             *rows,
             r"\bottomrule",
             r"\end{tabular}"]
    return "\n".join(lines) + "\n"
