"""Reference experiment 3: how does MOML's advantage over Per-FedAvg-FO change with participation?

Per-FedAvg-FO is MOML with beta = 1 (it is also FO-MAML / first-order FedMeta here: docs/results.md
section 2), so the comparison isolates the memory. Two sweeps (configs/sweeps/participation_*.yaml),
run with ``fedmaml sweep``'s resumable runner on the vectorized engine:

* families: sinusoid regression (K = 2) and scikit-learn digits (Dirichlet label skew);
* ``federated.fraction`` 1.0 (every client every round), 0.3, 0.1, 0.03 (3 of 100 clients a round);
* ``participation.model`` uniform, or heterogeneous availability ``p_i ~ Beta(0.5, 0.5)``;
* ``algorithm.name`` moml, per_fedavg; seeds 0-4.

The x axis of the figure is the *realized* participation rate (participations per client per
round, from each run's summary.json), because under heterogeneous availability only about half of
the clients are available in a round. The MOML advantage is paired by seed (same data, same
cohorts) and signed so that positive = MOML better.

    python simulations/participation_study.py              # run what is missing, then tables/figure
    python simulations/participation_study.py --analyze    # tables and figure from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedmaml.provenance import with_provenance

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"sinusoid": "participation_sinusoid.yaml", "digits": "participation_digits.yaml"}
MODELS = ("uniform", "heterogeneous")
ALGORITHMS = {"moml": "MOML", "per_fedavg": "Per-FedAvg-FO"}


def run_sweeps(out: Path, jobs: int) -> dict[str, float]:
    from fedmaml.sweep import load_sweep, run_sweep

    seconds = {}
    for family, spec_file in FAMILIES.items():
        start = time.perf_counter()
        base, spec = load_sweep(ROOT / "configs" / "sweeps" / spec_file)
        run_sweep(base, spec, out / family, jobs=jobs)
        seconds[family] = time.perf_counter() - start
    return seconds


def run_record(run: Any) -> dict[str, Any]:
    """What the study uses from one finished run."""
    cfg, summary = run.config, run.summary
    task = summary["metric"]  # loss or accuracy
    after = summary["after"]
    part = summary.get("participation", {})
    evals = [r["eval"] for r in run.rows if "eval" in r and r["round"] > 0]
    tracking = [e["seen.tracking-error.mean"] for e in evals if "seen.tracking-error.mean" in e]
    rate = part.get("participations", 0) / (cfg.federated.rounds * cfg.data.num_clients)
    return {"algorithm": cfg.algorithm.name, "fraction": cfg.federated.fraction,
            "model": cfg.participation.model, "seed": cfg.seed, "metric": task,
            "seen": after.get(f"seen.{task}.mean"),
            "seen_memory": after.get(f"seen.memory-{task}.mean"),
            "unseen": after.get(f"unseen.{task}.mean"),
            "rate": rate, "staleness": part.get("mean"), "staleness_p90": part.get("p90"),
            "first": part.get("first"),
            "tracking_final": after.get("seen.tracking-error.mean"),
            "tracking_mean": statistics.mean(tracking) if tracking else None,
            "memory_gap": after.get("seen.memory-gap.mean"),
            "memory_age": after.get("seen.staleness.mean"),
            "seconds": summary.get("seconds"), "dir": str(run.dir)}


def load(out: Path) -> dict[str, list[dict[str, Any]]]:
    from fedmaml.results.compare import load_runs

    records = {}
    for family in FAMILIES:
        if (out / family).exists():
            runs, _ = load_runs([out / family])
            records[family] = [run_record(r) for r in runs]
    return records


def stat(values: list[float | None]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def fmt(values: list[float | None], digits: int = 3) -> str:
    m, s, n = stat(values)
    return "-" if not n else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_adv(values: list[float]) -> str:
    """Mean ± std over seeds, and in how many seeds MOML was better."""
    if not values:
        return "-"
    return f"{fmt(values)} ({sum(v > 0 for v in values)}/{len(values)})"


def advantages(recs: list[dict[str, Any]], model: str, fraction: float) -> dict[str, list[float]]:
    """Per seed, MOML minus Per-FedAvg (signed: positive = MOML better): from w on trained clients,
    on unseen clients, and MOML from its memory against Per-FedAvg from w."""
    by = {(r["algorithm"], r["seed"]): r for r in recs
          if r["model"] == model and r["fraction"] == fraction}
    out: dict[str, list[float]] = {"seen": [], "unseen": [], "memory": []}
    for (alg, seed), m in by.items():
        p = by.get(("per_fedavg", seed))
        if alg != "moml" or p is None:
            continue
        sign = 1.0 if m["metric"] == "accuracy" else -1.0
        out["seen"].append(sign * (m["seen"] - p["seen"]))
        out["unseen"].append(sign * (m["unseen"] - p["unseen"]))
        if m["seen_memory"] is not None:
            out["memory"].append(sign * (m["seen_memory"] - p["seen"]))
    return out


def fractions(recs: list[dict[str, Any]]) -> list[float]:
    return sorted({r["fraction"] for r in recs}, reverse=True)


def table(records: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for family, recs in records.items():
        task = recs[0]["metric"]
        lines += [f"### {family} (personalized {task}; advantage > 0 = MOML better, (k/n) = "
                  "seeds where MOML was better)", "",
                  "| availability | fraction | participation rate | staleness mean (p90) | "
                  f"MOML {task}, trained (from w) | from memory | Per-FedAvg-FO {task}, trained | "
                  "advantage from w | advantage, memory vs w | advantage, unseen | "
                  "tracking error (final) | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model in MODELS:
            for fraction in fractions(recs):
                mine = [r for r in recs if r["model"] == model and r["fraction"] == fraction]
                moml = [r for r in mine if r["algorithm"] == "moml"]
                pfa = [r for r in mine if r["algorithm"] == "per_fedavg"]
                if not moml and not pfa:
                    continue
                adv = advantages(recs, model, fraction)
                stale = stat([r["staleness"] for r in moml or pfa])[0]
                p90 = stat([r["staleness_p90"] for r in moml or pfa])[0]
                lines.append(
                    f"| {model} | {fraction:g} | {stat([r['rate'] for r in mine])[0]:.3f} | "
                    f"{stale:.1f} ({p90:.0f}) | {fmt([r['seen'] for r in moml])} | "
                    f"{fmt([r['seen_memory'] for r in moml])} | {fmt([r['seen'] for r in pfa])} | "
                    f"{fmt_adv(adv['seen'])} | {fmt_adv(adv['memory'])} | "
                    f"{fmt_adv(adv['unseen'])} | "
                    f"{fmt([r['tracking_final'] for r in moml])} | {len(moml)}+{len(pfa)} |")
        lines.append("")
    return "\n".join(lines)


def figure(records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"uniform": "tab:blue", "heterogeneous": "tab:orange"}
    fig, axes = plt.subplots(len(records), 4, figsize=(17, 3.9 * len(records)), squeeze=False)
    for row, (family, recs) in zip(axes, records.items()):
        task = recs[0]["metric"]
        for model in MODELS:
            c = colors[model]
            pts = []
            for fraction in fractions(recs):
                mine = [r for r in recs if r["model"] == model and r["fraction"] == fraction]
                if not mine:
                    continue
                pts.append((stat([r["rate"] for r in mine])[0], fraction, mine))
            if not pts:
                continue
            x = [p[0] for p in pts]

            def band(ax, values, style, label):
                ms = [stat(v) for v in values]
                m = [s[0] for s in ms]
                sd = [s[1] for s in ms]
                ax.plot(x, m, style, color=c, label=label)
                ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=c, alpha=0.15)

            def of(alg, key):
                return [[r[key] for r in p[2] if r["algorithm"] == alg] for p in pts]

            band(row[0], of("moml", "seen"), "o-", f"MOML from w, {model}")
            band(row[0], of("moml", "seen_memory"), "^:", f"MOML from memory, {model}")
            band(row[0], of("per_fedavg", "seen"), "s--", f"Per-FedAvg-FO, {model}")
            advs = [advantages(recs, model, p[1]) for p in pts]
            band(row[1], [a["seen"] for a in advs], "o-", f"from w, {model}")
            band(row[1], [a["memory"] for a in advs], "^:", f"MOML memory vs PFA w, {model}")
            band(row[2], of("moml", "staleness"), "o-", f"sampled clients, {model}")
            band(row[2], of("moml", "memory_age"), "^:", f"panel memory age, {model}")
            band(row[3], of("moml", "tracking_final"), "o-", f"final, {model}")
            band(row[3], of("moml", "tracking_mean"), "^:", f"mean over evaluations, {model}")
        titles = [f"{family}: personalized {task}, trained clients",
                  f"{family}: MOML advantage ({'+' if task == 'accuracy' else '-'}Δ{task})",
                  f"{family}: rounds since previous participation",
                  f"{family}: tracking error ||u - A(w)|| / ||A(w)||"]
        for ax, title in zip(row, titles):
            ax.set_xscale("log")
            ax.set_xlabel("participation rate (per client per round)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row[1].axhline(0, color="black", lw=0.8)
        row[2].set_ylim(bottom=0)  # a memory refreshed in the evaluated round has age 0
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "participation"),
                    help="sweep directories go under it (one per family)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--analyze", action="store_true", help="only tables and figure, from the "
                                                           "runs that finished")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.analyze:
        seconds = run_sweeps(out, args.jobs)
        print("sweep wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    records = load(out)
    text = table(records)
    print(text)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(with_provenance(records), indent=1) + "\n", encoding="utf-8")
    docs = ROOT / "docs"
    (docs / "results" / "participation.md").write_text(text + "\n", encoding="utf-8")
    (docs / "results" / "participation.json").write_text(
        json.dumps(with_provenance({f: [{k: v for k, v in r.items() if k != "dir"} for r in recs]
                                    for f, recs in records.items()}), indent=1) + "\n", encoding="utf-8")
    figure(records, docs / "figures" / "participation.png")
    print(f"figure: {docs / 'figures' / 'participation.png'}")


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
