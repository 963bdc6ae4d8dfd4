"""``fedmaml compare``'s outputs: the comparison (fedmaml/results/compare.py, the data model) drawn as
figures (compare_plots.py) and written up as a Markdown report (compare_report.py).

This is the one module that knows all three; the figures and the report import the data model and
never the other way, so the comparison's numbers can be computed without a plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmaml.results.compare import BANDS, X_AXES, CompareError, build_comparison
from fedmaml.results.compare_plots import plot_client_distribution, plot_convergence
from fedmaml.results.compare_report import markdown_table, table_legend, write_report


@dataclass
class CompareOutput:
    out_dir: Path
    report: Path
    figures: list[Path]
    table: str  # the Markdown table and its legend, also printed by the CLI


def compare(paths: Sequence[str | Path], out_dir: str | Path | None = None,
            metric: str | None = None, xs: Sequence[str] = ("rounds",), log: str = "",
            target: float | None = None, band: str = "std", dist: str = "cdf",
            formats: Sequence[str] = ("png",)) -> CompareOutput:
    """Compare the runs under ``paths``: convergence figures (one per x axis), the per-client
    distribution at the final evaluation, and ``report.md``, all written into ``out_dir``."""
    for x in xs:
        if x not in X_AXES:
            raise CompareError(f"--x: {x!r} is not allowed; allowed: {', '.join(X_AXES)}")
    if band not in BANDS:
        raise CompareError(f"--band: {band!r} is not allowed; allowed: {', '.join(BANDS)}")
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
    report = write_report(comparison, out, figures, xs=xs, band=band, paths=paths)
    return CompareOutput(out_dir=out, report=report, figures=figures,
                         table=markdown_table(comparison) + table_legend(comparison))
