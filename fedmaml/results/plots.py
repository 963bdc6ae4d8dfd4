"""Plots of one run (the convergence figure written into every run directory)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmaml.results.recorder import read_metrics, read_summary

#: One figure, reused by every call: creating a figure's axes and tick labels is most of the cost
#: of drawing it, and a vectorized sweep draws one for each of its runs.
_FIGURE: list[Any] = []


def _blank_figure() -> tuple[Any, Any, Any]:
    """The reusable figure and its two axes, emptied of the previous run's lines and legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not _FIGURE or not plt.fignum_exists(_FIGURE[0].number):
        fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
        ax_eval.set_xlabel("round")
        ax_train.set_xlabel("round")
        ax_train.set_ylabel("training loss")
        ax_train.set_yscale("log")
        for ax in (ax_eval, ax_train):
            ax.grid(alpha=0.3)
        # fixed margins: tight_layout measures every tick label
        fig.subplots_adjust(left=0.07, right=0.985, bottom=0.13, top=0.88, wspace=0.22)
        _FIGURE[:] = [fig, ax_eval, ax_train]
    fig, ax_eval, ax_train = _FIGURE
    for ax in (ax_eval, ax_train):
        for line in list(ax.lines):
            line.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        ax.set_prop_cycle(None)  # every run's lines get the same colours
    return fig, ax_eval, ax_train


#: The training-loss columns the right panel draws, with their legends.
TRAIN_CURVES = (("loss_before", "query loss at w"), ("loss_after", "query loss after adaptation"))


class Curves:
    """What the figure draws, gathered from a run's rows: each training-loss column by round, and
    the evaluation rows. A run's ledger adds its rows as it writes them, so that the figure at the
    run's end does not read thousands of rows back (a vectorized sweep ends many runs at once)."""

    def __init__(self) -> None:
        self.train: dict[str, tuple[array, array]] = {k: (array("q"), array("d"))
                                                      for k, _ in TRAIN_CURVES}
        self.evaluations: list[tuple[int, dict[str, Any]]] = []

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, Any]]) -> Curves:
        curves = cls()
        curves.add(rows)
        return curves

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rows as written to metrics.jsonl, in order."""
        for r in rows:
            for k, (rounds, values) in self.train.items():
                if k in r:
                    rounds.append(r["round"])
                    values.append(math.nan if r[k] is None else r[k])  # null: not finite
            if "eval" in r:
                self.evaluations.append((r["round"], r["eval"]))


def plot_run(run_dir: str | Path, out: str | Path | None = None,
             curves: Curves | None = None) -> Path:
    """``convergence.png``: personalized evaluation metric vs round, and training loss.
    ``curves``: the run's rows as gathered while it was written (None: read from metrics.jsonl)."""
    run_dir = Path(run_dir)
    if curves is None:
        curves = Curves.of(read_metrics(run_dir))
    summary = read_summary(run_dir) or {}
    key = summary.get("metric", "loss")
    fig, ax_eval, ax_train = _blank_figure()
    series = [("seen", "", "clients that trained, from w"),
              ("seen", "memory-", "clients that trained, from memory"),
              ("unseen", "", "unseen clients, from w")]
    for group, prefix, label in series:
        metric = f"{group}.{prefix}{key}.mean"
        pts = [(r, e[metric]) for r, e in curves.evaluations if metric in e]
        if pts:
            ax_eval.plot(*zip(*pts), marker="o", label=label)
    ax_eval.set_ylabel(f"personalized {key} (after adaptation)")
    for k, label in TRAIN_CURVES:
        rounds, values = curves.train[k]
        if rounds:
            ax_train.plot(rounds, values, label=label, alpha=0.8)
    for ax in (ax_eval, ax_train):
        if ax.lines:
            ax.legend()
        ax.relim()
        ax.autoscale_view()
    fig.suptitle(f"{summary.get('name', run_dir.name)} ({summary.get('algorithm', '')})")
    out = Path(out) if out else run_dir / "convergence.png"
    # zlib's fastest level: the file is a tenth larger, and written 5 ms sooner
    fig.savefig(out, dpi=120, pil_kwargs={"compress_level": 1})
    return out
