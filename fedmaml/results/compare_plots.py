"""The figures of ``fedmaml compare``: convergence (mean over seeds with a band) and the per-client
distribution of the personalized metric at the final evaluation.

Figures are sized for a paper column, with labelled axes, the legend outside the axes so it never
hides a curve, and one colour (and marker) per setting, the same in every figure of a comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmaml.results.compare import (X_LABELS, Comparison, axis_label, client_axis_label,
                                     final_client_values, setting_curve)
from fedmaml.results.wording import counted

_STYLE = {
    "font.size": 10, "axes.labelsize": 10, "legend.fontsize": 9, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.8,
    "savefig.dpi": 200, "figure.dpi": 100,
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_BAND_TEXT = {"std": "±1 std over seeds", "sem": "±1 standard error over seeds",
              "minmax": "min-max over seeds"}
_MAX_WIDTH = 8.0  # inches: a page width, for the violin figure
_MAX_MARKED_POINTS = 30  # beyond this markers clutter the line; colour alone tells settings apart


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def setting_colors(n: int) -> list[Any]:
    """One colour per setting, by its position in the (sorted) comparison."""
    plt = _pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("viridis")(i / (n - 1)) for i in range(n)]


def _save(fig: Any, out: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def _legend(ax: Any, title: str | None = None) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=title,
              title_fontsize=9, borderaxespad=0.0)


def _plain_ticks(ax: Any, which: str) -> None:
    """Log-axis ticks as plain numbers (2.5, not 2.5x10^0). Within one decade only minor ticks fall
    in range, so they are labelled too; over several decades labelled minors would be clutter."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt if lo > 0 and hi / lo < 10 else NullFormatter())


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between two positive values (for an axis drawn in log10 units)."""
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [lo, hi]


def pooled_text(per_run: Sequence[np.ndarray]) -> str:
    """What a setting's pooled per-client values count: ``5 clients × 2 seeds`` (``4-5 clients ×
    2 seeds`` when runs evaluated different numbers; the values that are not finite are not drawn,
    so not counted)."""
    counts = [int(np.isfinite(v).sum()) for v in per_run]
    counts = [n for n in counts if n]
    lo, hi = min(counts), max(counts)
    clients = counted(lo, "client") if lo == hi else f"{lo}-{hi} clients"
    runs = len(counts)
    return clients if runs == 1 else f"{clients} × {runs} seeds"


def plot_convergence(c: Comparison, x: str, out: Path, log: str = "", band: str = "std",
                     formats: Sequence[str] = ("png",)) -> list[Path]:
    """``convergence-<metric>-<x>.<fmt>``: the metric against ``x``, one line per setting."""
    plt = _pyplot()
    colors = setting_colors(len(c.settings))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        any_band = False
        for i, (setting, color) in enumerate(zip(c.settings, colors)):
            curve = setting_curve(setting, c.metric, x, band)
            keep = np.isfinite(curve.x) & (curve.x > 0 if "x" in log else True)
            cx, mean, low, high = curve.x[keep], curve.mean[keep], curve.low[keep], curve.high[keep]
            marker = _MARKERS[i % len(_MARKERS)] if len(cx) <= _MAX_MARKED_POINTS else None
            ax.plot(cx, mean, color=color, marker=marker, markersize=4,
                    label=f"{setting.label} (n={curve.n})")
            if curve.n > 1:
                # Fainter with more settings: overlapping bands must not hide the lines.
                ax.fill_between(cx, low, high, color=color, linewidth=0,
                                alpha=0.2 if len(c.settings) <= 3 else 0.1)
                any_band = True
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(axis_label(c.metric.key))
        if "x" in log:
            ax.set_xscale("log")
            _plain_ticks(ax, "x")
        if "y" in log:
            ax.set_yscale("log")
            _plain_ticks(ax, "y")
        if x in ("bytes", "samples"):
            from matplotlib.ticker import EngFormatter

            ax.xaxis.set_major_formatter(EngFormatter(unit="B" if x == "bytes" else ""))
        _legend(ax, f"mean, shaded {_BAND_TEXT[band]}" if any_band else "mean over seeds")
        paths = _save(fig, out, f"convergence-{c.metric.key}-{x}", formats)
        plt.close(fig)
    return paths


def plot_client_distribution(c: Comparison, out: Path, kind: str = "cdf", log: bool = False,
                             formats: Sequence[str] = ("png",)) -> list[Path]:
    """``clients-<metric>.<fmt>``: per-client personalized quality at each run's final evaluation,
    pooled over seeds, as an empirical CDF (one step line per setting) or violins. Nothing when the
    runs recorded no per-client values."""
    if kind not in ("cdf", "violin"):
        from fedmaml.results.compare import CompareError

        raise CompareError(f"--dist: {kind!r} is not allowed; allowed: cdf, violin")
    plt = _pyplot()
    per_run = [[np.array(v) for v in final_client_values(s, c.metric)] for s in c.settings]
    data = [np.concatenate(runs) if runs else np.array([]) for runs in per_run]
    if not any(len(d) for d in data):
        return []
    key = c.metric.clients_key(c.task_metric)
    what = client_axis_label(key)
    colors = setting_colors(len(c.settings))
    with plt.rc_context(_STYLE):
        if kind == "cdf":
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            for setting, values, runs, color in zip(c.settings, data, per_run, colors):
                values = np.sort(values[np.isfinite(values)])
                if not len(values):
                    continue
                frac = np.arange(1, len(values) + 1) / len(values)
                ax.step(np.r_[values[0], values], np.r_[0.0, frac], where="post", color=color,
                        label=f"{setting.label} ({pooled_text(runs)})")
            ax.set_xlabel(what)
            ax.set_ylabel("fraction of clients")
            ax.set_ylim(0, 1.02)
            if log:
                ax.set_xscale("log")
                _plain_ticks(ax, "x")
            _legend(ax, "empirical CDF, seeds pooled")
        else:
            # One label line per differing key reads best; when that would make the figure wider
            # than a page, slanted one-line labels instead.
            tick_labels = [s.label.replace(", ", "\n") for s in c.settings]
            longest = max(len(line) for t in tick_labels for line in t.split("\n"))
            width = max(4.0, len(c.settings) * max(1.1, 0.09 * longest) + 1.5)
            slanted = width > _MAX_WIDTH
            if slanted:
                tick_labels = [s.label for s in c.settings]
                width = max(4.0, min(_MAX_WIDTH, 0.9 * len(c.settings) + 1.5))
            fig, ax = plt.subplots(figsize=(width, 3.6))
            shown = [(i, d[np.isfinite(d) & ((d > 0) if log else True)]) for i, d in enumerate(data)]
            shown = [(i, d) for i, d in shown if len(d)]
            # On a log scale the density is estimated on log10(values), so the violin's shape is
            # that of the distribution as the axis shows it; ticks then name the values themselves.
            plotted = [np.log10(d) if log else d for _, d in shown]
            parts = ax.violinplot(plotted, positions=[i for i, _ in shown], showmedians=True,
                                  widths=0.8)
            for body, (i, _) in zip(parts["bodies"], shown):
                body.set_facecolor(colors[i])
                body.set_edgecolor(colors[i])
                body.set_alpha(0.5)
            for name in ("cbars", "cmins", "cmaxes", "cmedians"):
                if name in parts:
                    parts[name].set_color("0.25")
                    parts[name].set_linewidth(1.0)
            # One label line per differing key: long labels stay readable without rotation.
            ax.set_xticks(range(len(c.settings)), tick_labels, rotation=30 if slanted else 0,
                          ha="right" if slanted else "center")
            ax.set_ylabel(what)
            if log:
                everything = np.concatenate([d for _, d in shown])
                ticks = _log_ticks(float(everything.min()), float(everything.max()))
                ax.set_yticks(np.log10(ticks), [f"{t:g}" for t in ticks])
                ax.set_ylabel(what + ", log scale")
            ax.grid(axis="x", visible=False)
        stem = f"clients-{key.rsplit('.', 1)[0]}"
        paths = _save(fig, out, stem, formats)
        plt.close(fig)
    return paths

