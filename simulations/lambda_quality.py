"""The quality side of Lambda-pattern selection (docs/lambda_patterns.md).

For each offline few-shot benchmark (5-way 1-shot digits with Conv-4, 5-way 1-shot MNIST-1D with an
MLP; configs/lambda_*.yaml) and seed: meta-train with ``fedmaml run`` (or reuse a finished run
directory), measure every candidate pattern once on the validation clients (held-out examples of
training clients; time on this machine) and on the test clients (unseen clients, never trained),
then apply the selection rule at each epsilon. Reports, per epsilon, the chosen pattern, its speedup
and its test accuracy against full adaptation, with the paired standard error of the difference over
test clients (all patterns are measured on the same test examples). Also reports one-step adaptation
accuracy for every one-step pattern (full, top-k) and no adaptation.

    PYTHONPATH=. .venv/bin/python simulations/lambda_quality.py --out lambda_quality.json \\
        --md lambda_quality.md --seeds 0 1 2

Runs go to ``--runs DIR`` (default results/lambda_quality); a finished run there is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmaml.config import load_config, replace_paths
from fedmaml.core import pattern_selection as ps
from fedmaml.core.patterns import Pattern
from fedmaml.experiment import run_experiment
from fedmaml.federated import pattern_selection as fps
from fedmaml.federated.setup import setup_for
from fedmaml.provenance import with_provenance
from fedmaml.results.recorder import read_summary

BENCHMARKS = {"digits_conv4": "configs/lambda_digits.yaml",
              "mnist1d_mlp": "configs/lambda_mnist1d.yaml"}
EPSILONS = (0.5, 1.0, 2.0)


def trained_run(config_path: str, seed: int, runs: Path, name: str, overrides: list[str]) -> Path:
    """Train (selection off: this script selects) unless a finished run exists."""
    run_dir = runs / f"{name}-seed{seed}"
    if read_summary(run_dir) is not None and (run_dir / "model.pt").exists():
        print(f"reusing {run_dir}", file=sys.stderr)
        return run_dir
    cfg = replace_paths(load_config(config_path, overrides), {"seed": seed,
                                                              "pattern_selection.mode": "none"})
    return run_experiment(cfg, quiet=True, run_dir=run_dir)


def per_client(setup, w, ids: list[int], patterns: list[Pattern]) -> list[ps.Measurement]:
    return [fps.measure_client(setup, c, w, patterns, warmup=0, repeats=0) for c in ids]


def paired(test: list[ps.Measurement], i: int, j: int) -> tuple[float, float]:
    """Mean over test clients of (accuracy of candidate i - candidate j), in points, and its SE."""
    d = [100 * (m.quality[i] - m.quality[j]) for m in test]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), se


def evaluate_run(run_dir: Path, epsilons: tuple[float, ...]) -> dict[str, Any]:
    cfg = load_config(run_dir / "config.yaml")
    setup = setup_for(cfg)
    w = fps.load_checkpoint(run_dir / "model.pt", setup.initial_params)
    sel, fed = cfg.pattern_selection, setup.federation
    threads = cfg.engine.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    val_ids, test_ids = ps.validation_and_test_clients(
        fed.num_clients, fed.num_unseen, sel.validation_clients, sel.test_clients, cfg.seed)
    cands = [c for c in fps.candidates_for(setup) if c.valid]
    pats = [c.pattern for c in cands]
    started = time.perf_counter()
    load_before = ps.machine_info()["loadavg"]
    val = ps.combine_measurements([fps.measure_client(setup, c, w, pats, warmup=sel.warmup,
                                                      repeats=sel.repeats) for c in val_ids])
    test_parts = per_client(setup, w, test_ids, pats)
    test = ps.combine_measurements(test_parts)
    unit = fps.epsilon_unit(setup)
    full = str(pats[0])
    out: dict[str, Any] = {
        "run": run_dir.name, "model": setup.model.describe(), "validation_clients": len(val_ids),
        "validation_examples": val.examples, "test_clients": len(test_ids),
        "test_examples": test.examples, "unit": unit,
        "timing": {**ps.machine_info(), "loadavg_before": load_before, "warmup": sel.warmup,
                   "repeats": sel.repeats, "where": "this process, digits/MNIST-1D-shaped inputs"},
        "candidates": [{"pattern": p, "ms": ms, "speedup": val.ms[0] / ms,
                        "val_accuracy": q, "test_accuracy": t,
                        "test_change_pts": paired(test_parts, i, 0)[0],
                        "test_change_se": paired(test_parts, i, 0)[1]}
                       for i, (p, ms, q, t) in enumerate(zip(val.patterns, val.ms, val.quality,
                                                             test.quality))],
        "selections": {}}
    for eps in epsilons:
        s = ps.select_pattern(val, full, eps, unit, time_tolerance=sel.time_tolerance)
        i = val.patterns.index(s.chosen)
        change, se = paired(test_parts, i, 0)
        out["selections"][f"{eps:g}"] = {
            "chosen": s.chosen, "reason": s.reason, "speedup": val.ms[0] / val.ms[i],
            "val_change_pts": s.row(s.chosen)["change"], "test_accuracy": test.quality[i],
            "full_test_accuracy": test.quality[0], "test_change_pts": change, "test_change_se": se}
    # One-step adaptation: every one-step pattern of the family, and no adaptation at all.
    one = [c.pattern for c in ps.build_candidates(setup.model.group_names, 1,
                                                   model_name=setup.model.name, user="none")]
    val1 = ps.combine_measurements(per_client(setup, w, val_ids, one))
    test1_parts = per_client(setup, w, test_ids, one)
    test1 = ps.combine_measurements(test1_parts)
    out["one_step"] = [{"pattern": str(p), "val_accuracy": v, "test_accuracy": t,
                        "test_change_pts": paired(test1_parts, i, 0)[0],
                        "test_change_se": paired(test1_parts, i, 0)[1]}
                       for i, (p, v, t) in enumerate(zip(one, val1.quality, test1.quality))]
    out["seconds"] = time.perf_counter() - started
    return out


def md_pattern(text: str) -> str:
    """A pattern inside a Markdown table cell: '|' would end the cell."""
    return text.replace("|", "\\|")


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for bench, runs in result["benchmarks"].items():
        first = runs[0]
        lines += [f"### {bench}: {first['model']}", "",
                  f"Validation: {first['validation_clients']} training clients' held-out examples "
                  f"({first['validation_examples']}); test: {first['test_clients']} unseen clients "
                  f"({first['test_examples']} examples). Speedup: median adaptation time on these "
                  f"inputs, {first['timing']['torch_threads']} thread(s).", "",
                  "| seed | epsilon (pts) | chosen | speedup | val change (pts) | test acc chosen | "
                  "test acc full | test change (pts) ± paired SE |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            for eps, s in r["selections"].items():
                lines.append(f"| {r['run'].rsplit('seed', 1)[-1]} | {eps} | `{md_pattern(s['chosen'])}` | "
                             f"{s['speedup']:.2f}x | {s['val_change_pts']:+.2f} | "
                             f"{100 * s['test_accuracy']:.2f} | {100 * s['full_test_accuracy']:.2f} | "
                             f"{s['test_change_pts']:+.2f} ± {s['test_change_se']:.2f} |")
        lines += ["", f"All candidates (seed {first['run'].rsplit('seed', 1)[-1]}):", "",
                  "| pattern | ms | speedup | val acc | test acc | test change (pts) ± SE |",
                  "|---|---|---|---|---|---|"]
        for c in first["candidates"]:
            lines.append(f"| `{md_pattern(c['pattern'])}` | {c['ms']:.3f} | {c['speedup']:.2f}x | "
                         f"{100 * c['val_accuracy']:.2f} | {100 * c['test_accuracy']:.2f} | "
                         f"{c['test_change_pts']:+.2f} ± {c['test_change_se']:.2f} |")
        lines += ["", "One-step adaptation (test accuracy, mean over seeds; change vs one full "
                  "step ± paired SE of seed 0):", "",
                  "| pattern | val acc | test acc | test change (pts) ± SE |", "|---|---|---|---|"]
        for i, row in enumerate(first["one_step"]):
            v = np.mean([r["one_step"][i]["val_accuracy"] for r in runs])
            t = np.mean([r["one_step"][i]["test_accuracy"] for r in runs])
            lines.append(f"| `{md_pattern(row['pattern'])}` | {100 * v:.2f} | {100 * t:.2f} | "
                         f"{row['test_change_pts']:+.2f} ± {row['test_change_se']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", metavar="FILE.json", help="where to write the results (required "
                    "unless --from-json)")
    ap.add_argument("--md", metavar="FILE.md", help="also write the tables as Markdown")
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument("--runs", default="results/lambda_quality", metavar="DIR")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for training, e.g. federated.rounds=50 (quick checks)")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: print (and --md) the "
                    "tables of an earlier --out FILE")
    args = ap.parse_args(argv)
    if not (args.out or args.from_json):
        ap.error("--out FILE.json is required")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        text = markdown({"benchmarks": {b: v["runs"] for b, v in data["benchmarks"].items()}})
        if args.md:
            Path(args.md).write_text(text)
        print(text)
        return 0
    result: dict[str, Any] = {"benchmarks": {}, "epsilons": args.epsilons,
                              "command": "simulations/lambda_quality.py " + " ".join(
                                  argv if argv is not None else sys.argv[1:])}
    for bench in args.benchmarks:
        runs = []
        for seed in args.seeds:
            run_dir = trained_run(BENCHMARKS[bench], seed, Path(args.runs), bench, args.set)
            runs.append(evaluate_run(run_dir, tuple(args.epsilons)))
            print(f"{bench} seed {seed}: " + ", ".join(
                f"eps {e}: {s['chosen']} {s['speedup']:.2f}x, test {s['test_change_pts']:+.2f} pts"
                for e, s in runs[-1]["selections"].items()), file=sys.stderr)
        result["benchmarks"][bench] = runs
    # The JSON is what lambda_speed.py --quality reads: name the model of each benchmark.
    for bench, runs in result["benchmarks"].items():
        result["benchmarks"][bench] = {"model": runs[0]["model"], "runs": runs,
                                       "selections": runs[0]["selections"]}
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown({"benchmarks": {b: v["runs"] for b, v in
                                                          result["benchmarks"].items()}}))
    print(markdown({"benchmarks": {b: v["runs"] for b, v in result["benchmarks"].items()}}))
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
