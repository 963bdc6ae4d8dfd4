"""Plots of one run (the convergence figure written into every run directory)."""

from __future__ import annotations

from pathlib import Path

from fedmaml.results.recorder import read_metrics, read_summary


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``convergence.png``: personalized evaluation metric vs round, and training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    summary = read_summary(run_dir) or {}
    key = summary.get("metric", "loss")
    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("seen", "", "clients that trained, from w"),
              ("seen", "memory-", "clients that trained, from memory"),
              ("unseen", "", "unseen clients, from w")]
    for group, prefix, label in series:
        pts = [(r["round"], r["eval"][f"{group}.{prefix}{key}.mean"]) for r in rows
               if f"{group}.{prefix}{key}.mean" in r.get("eval", {})]
        if pts:
            ax_eval.plot(*zip(*pts), marker="o", label=label)
    ax_eval.set_xlabel("round")
    ax_eval.set_ylabel(f"personalized {key} (after adaptation)")
    if ax_eval.lines:
        ax_eval.legend()
    ax_eval.grid(alpha=0.3)
    for k, label in (("loss_before", "query loss at w"), ("loss_after", "query loss after adaptation")):
        pts = [(r["round"], r[k]) for r in rows if k in r]
        if pts:
            ax_train.plot(*zip(*pts), label=label, alpha=0.8)
    ax_train.set_xlabel("round")
    ax_train.set_ylabel("training loss")
    ax_train.set_yscale("log")
    if ax_train.lines:
        ax_train.legend()
    ax_train.grid(alpha=0.3)
    fig.suptitle(f"{summary.get('name', run_dir.name)} ({summary.get('algorithm', '')})")
    # fixed margins: tight_layout measures every tick label, the dearest part of a figure that a
    # vectorized sweep draws for each of its runs
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.13, top=0.88, wspace=0.22)
    out = Path(out) if out else run_dir / "convergence.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
