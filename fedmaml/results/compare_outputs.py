"""``fedmaml compare``'s outputs: the comparison (fedmaml/results/compare.py, the data model) drawn as
figures (compare_plots.py), written up as a Markdown report (compare_report.py) and, on request, its
table as CSV, LaTeX and JSON files (compare_tables.py).

This is the one module that knows them all; each imports the data model and never the other way,
so the comparison's numbers are computed once, and without a plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmaml.results.compare import BANDS, X_AXES, CompareError, build_comparison
from fedmaml.results.compare_plots import plot_client_distribution, plot_convergence
from fedmaml.results.compare_report import markdown_table, table_legend, write_report
from fedmaml.results.compare_tables import TABLE_FORMATS, write_tables


@dataclass
class CompareOutput:
    out_dir: Path
    report: Path
    figures: list[Path]
    table: str  # the Markdown table and its legend, also printed by the CLI
    tables: list[Path] = field(default_factory=list)  # table-<metric>.<csv|tex|json>


def compare(paths: Sequence[str | Path], out_dir: str | Path | None = None,
            metric: str | None = None, xs: Sequence[str] = ("rounds",), log: str = "",
            target: float | None = None, band: str = "std", dist: str = "cdf",
            formats: Sequence[str] = ("png",), table_formats: Sequence[str] = ()) -> CompareOutput:
    """Compare the runs under ``paths``: convergence figures (one per x axis), the per-client
    distribution at the final evaluation, ``report.md``, and the table in each of
    ``table_formats`` (csv, tex, json: ``table-<metric>.<format>``), all written into ``out_dir``.
    The arguments are those of ``fedmaml compare`` (docs/comparing.md); :func:`build_comparison`
    gives the comparison itself, without writing anything."""
    for x in xs:
        if x not in X_AXES:
            raise CompareError(f"--x: {x!r} is not allowed; allowed: {', '.join(X_AXES)}")
    if band not in BANDS:
        raise CompareError(f"--band: {band!r} is not allowed; allowed: {', '.join(BANDS)}")
    for fmt in table_formats:
        if fmt not in TABLE_FORMATS:
            raise CompareError(f"--table-format: {fmt!r} is not allowed; allowed: "
                               f"{', '.join(TABLE_FORMATS)}")
    if set(log) - {"x", "y"}:
        raise CompareError(f"--log: {log!r} is not allowed; allowed: x, y, xy")
    if out_dir is None:
        if len(paths) != 1:
            raise CompareError("--out DIR is needed when comparing several directories")
        out_dir = Path(paths[0]) / "compare"
    comparison = build_comparison(paths, metric, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    for x in xs:
        figures += plot_convergence(comparison, x, out, log=log, band=band, formats=formats)
    figures += plot_client_distribution(comparison, out, kind=dist, log="y" in log, formats=formats)
    tables = write_tables(comparison, out, table_formats)
    report = write_report(comparison, out, figures, xs=xs, band=band, paths=paths, tables=tables)
    return CompareOutput(out_dir=out, report=report, figures=figures,
                         table=markdown_table(comparison) + table_legend(comparison),
                         tables=tables)
