"""Adaptation speed of Lambda patterns vs full adaptation (docs/lambda_patterns.md).

Conv-4 on Omniglot-shaped 20-way 1-shot support sets (1x28x28, width 64; max-pool and strided
variants) and miniImageNet-shaped 5-way 1-shot support sets (3x84x84, width 32), 5 adaptation steps.
For every candidate of the structured family (top-k groups at every step; full for the first m
steps, then top-k) and every combination of torch threads (1, 2), order (first: the adaptation
alone; second: the differentiable adaptation plus the backward pass through it, what a second-order
meta-step pays per task) and prefix caching (on, off), it measures the median wall time of one
adaptation after warm-up. Candidates are timed in interleaved rounds, so load changes on a shared
machine hit all of them alike; the load average is recorded before and after each setting.

Timing does not depend on the pixel values, so the inputs are random (Omniglot and miniImageNet are
not available offline here). Run:

    PYTHONPATH=. .venv/bin/python simulations/benchmarks/lambda_speed.py --out lambda_speed.json

Output: ``{"<setting>": {"full_ms", "patterns": {"<pattern>": {"ms", "speedup"}}, "variants":
{"threads=1,order=first,cache=on": {same}, ...}, "load": ...}, "meta": ..., "targets": ...}``;
the top-level ``full_ms``/``patterns`` of a setting are its headline variant (1 thread, first order,
caching on). ``--chosen PATTERN`` (repeatable) or ``--quality FILE`` (the output of
simulations/lambda_quality.py) adds the speedup of patterns chosen by selection to ``targets``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedmaml.core.losses import cross_entropy
from fedmaml.core.pattern_selection import (adaptation_runner, family_patterns, machine_info,
                                            median_times_ms)
from fedmaml.core.patterns import Pattern
from fedmaml.models import conv4
from fedmaml.provenance import with_provenance

STEPS = 5
ALPHA = 0.4  # Finn et al.'s Omniglot step size; the value does not change the cost
HEADLINE = "threads=1,order=first,cache=on"

#: name -> (input shape, ways, shots, width, strided)
SETTINGS: dict[str, tuple[tuple[int, int, int], int, int, int, bool]] = {
    "omniglot_20w1s": ((1, 28, 28), 20, 1, 64, False),
    "omniglot_20w1s_strided": ((1, 28, 28), 20, 1, 64, True),
    "miniimagenet_5w1s": ((3, 84, 84), 5, 1, 32, False),
}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_setting(name: str, threads: list[int], orders: list[str], caches: list[bool],
                  extra: list[Pattern], warmup: int, repeats: int, full_steps: tuple[int, ...],
                  width_override: int = 0) -> dict[str, Any]:
    shape, ways, shots, width, strided = SETTINGS[name]
    width = width_override or width
    model = conv4(shape, ways, width=width, strided=strided)
    w = model.init(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(ways * shots, *shape, generator=g)
    y = torch.arange(ways).repeat(shots)
    patterns = [p for p, _ in family_patterns(model.num_groups, STEPS, full_steps=full_steps)]
    patterns += [p for p in extra if str(p) not in {str(q) for q in patterns}]
    out: dict[str, Any] = {"model": model.describe(), "support": [ways * shots, *shape],
                           "steps": STEPS, "variants": {}, "load": {"before": load()}}
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for order in orders:
            for cache in caches:
                key = f"threads={n_threads},order={order},cache={'on' if cache else 'off'}"
                start = time.perf_counter()
                runners = [adaptation_runner(model, w, x, y, cross_entropy, p, ALPHA,
                                             second_order=order == "second", cache_prefix=cache)
                           for p in patterns]
                ms = median_times_ms(runners, warmup=warmup, repeats=repeats)
                full = ms[0]  # family_patterns puts the full pattern first
                out["variants"][key] = {
                    "full_ms": round(full, 3),
                    "patterns": {str(p): {"ms": round(t, 3), "speedup": round(full / t, 2)}
                                 for p, t in zip(patterns, ms)},
                    "load_after": load(), "seconds": round(time.perf_counter() - start, 1)}
                print(f"{name} {key}: full {full:.1f} ms, head-only "
                      f"{out['variants'][key]['patterns'][str(patterns[1])]['speedup']}x "
                      f"({time.perf_counter() - start:.0f}s, load {load()})", file=sys.stderr)
    out["load"]["after"] = load()
    return out


def merge_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting measured in several passes (spread over time, so over the machine's load):
    each pattern's time is the median over passes of its per-pass median; the per-pass speedups are
    kept to show the spread."""
    first = passes[0]
    out = {k: first[k] for k in ("model", "support", "steps")}
    out["load"] = [p["load"] for p in passes]
    out["variants"] = {}
    for key, v in first["variants"].items():
        ms = {pat: statistics.median(p["variants"][key]["patterns"][pat]["ms"] for p in passes)
              for pat in v["patterns"]}
        full = next(iter(ms.values()))  # the full pattern comes first
        out["variants"][key] = {
            "full_ms": round(full, 3),
            "patterns": {pat: {"ms": round(t, 3), "speedup": round(full / t, 2),
                               "pass_speedups": [p["variants"][key]["patterns"][pat]["speedup"]
                                                 for p in passes]}
                         for pat, t in ms.items()}}
    headline = out["variants"].get(HEADLINE) or next(iter(out["variants"].values()))
    return {"full_ms": headline["full_ms"], "patterns": headline["patterns"], **out}


def chosen_from_quality(path: str) -> dict[str, list[str]]:
    """``{pattern: ["<run> epsilon=<e>", ...]}`` from simulations/lambda_quality.py's JSON."""
    data = json.loads(Path(path).read_text())
    out: dict[str, list[str]] = {}
    for bench, b in data.get("benchmarks", {}).items():
        if not b.get("model", "").startswith("conv4"):  # only Conv-4 patterns fit these models
            continue
        for run in b.get("runs", []):
            for eps, sel in run.get("selections", {}).items():
                out.setdefault(sel["chosen"], []).append(f"{run['run']} epsilon={eps}")
    return out


def targets(result: dict[str, Any], chosen: dict[str, list[str]]) -> dict[str, Any]:
    """The issue's targets, on the headline variant (1 thread, first order, caching)."""
    out: dict[str, Any] = {}
    head = str(Pattern.top(5, 1, STEPS))
    for name in SETTINGS:
        if name not in result:
            continue
        pats = result[name]["patterns"]
        out[f"{name}: head-only with caching >= 10x"] = {
            "speedup": pats[head]["speedup"], "met": pats[head]["speedup"] >= 10}
        for pattern, labels in chosen.items():
            if pattern in pats:
                s = pats[pattern]["speedup"]
                out[f"{name}: chosen {pattern} >= 4x"] = {"speedup": s, "met": s >= 4,
                                                          "chosen_by": labels}
    return out


def md_pattern(text: str) -> str:
    """A pattern inside a Markdown table cell: '|' would end the cell."""
    return text.replace("|", "\\|")


def markdown(result: dict[str, Any]) -> str:
    """One table per setting: each pattern's ms and speedup vs full in every variant."""
    lines = []
    meta = result["meta"]
    for name in SETTINGS:
        if name not in result:
            continue
        r = result[name]
        variants = list(r["variants"])
        short = [v.replace("threads=", "").replace(",order=", " thr, ").replace(",cache=", " order, cache ")
                 for v in variants]
        lines += [f"#### {name}: {r['model']}, support {r['support']}, {r['steps']} steps", "",
                  "Load average (1, 5, 15 min) before / after each pass: " + "; ".join(
                      f"{p['before']} / {p['after']}" for p in r["load"]) + ".", "",
                  "| pattern | " + " | ".join(short) + " |",
                  "|---|" + "---|" * len(variants),
                  "| full (ms) | " + " | ".join(f"{r['variants'][v]['full_ms']:.1f}" for v in variants)
                  + " |"]
        for p in r["variants"][variants[0]]["patterns"]:
            cells = []
            for v in variants:
                e = r["variants"][v]["patterns"][p]
                cells.append(f"{e['ms']:.1f} ms, **{e['speedup']:.1f}x**")
            lines.append(f"| `{md_pattern(p)}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| target (1 thread, first order, caching) | speedup (median) | per pass | met |",
              "|---|---|---|---|"]
    for k, v in result["targets"].items():
        name, rest = k.split(": ", 1)
        pat = str(Pattern.top(5, 1, STEPS)) if rest.startswith("head-only") else rest.split()[1]
        per = result[name]["patterns"][pat].get("pass_speedups", [])
        lines.append(f"| {md_pattern(k)} | {v['speedup']}x | {', '.join(f'{x}x' for x in per)} | "
                     f"{'yes' if v['met'] else 'no'} |")
    lines += ["", f"torch {meta['torch']}, {meta['cpus']} CPUs; per pass the median of "
              f"{meta['repeats']} interleaved timings after {meta['warmup']} warm-up, then the "
              f"median over {meta['passes']} passes; {meta['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, metavar="FILE.json")
    ap.add_argument("--md", metavar="FILE.md", help="also write the tables as Markdown")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--orders", nargs="+", default=["first", "second"], choices=["first", "second"])
    ap.add_argument("--cache", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--full-steps", nargs="+", type=int, default=[1, 2], metavar="M",
                    help="m of the 'full first m steps, then top-k' candidates")
    ap.add_argument("--width", type=int, default=0, help="override the Conv-4 width (quick checks "
                    "only: the documented numbers use each setting's own width)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3, help="measure everything this many times, "
                    "one pass after the other, and report the median over passes")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--chosen", action="append", default=[], metavar="PATTERN",
                    help="a pattern chosen by selection (5 groups, any steps); reported in targets")
    ap.add_argument("--quality", metavar="FILE", help="lambda_quality.py output: its Conv-4 choices "
                    "are reported in targets")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: rewrite --md from an "
                    "earlier --out FILE")
    args = ap.parse_args(argv)

    if args.from_json:
        Path(args.md or args.out).write_text(markdown(json.loads(Path(args.from_json).read_text())))
        return 0
    chosen = chosen_from_quality(args.quality) if args.quality else {}
    for p in args.chosen:
        chosen.setdefault(str(Pattern.parse(p)), []).append("--chosen")
    extra = [Pattern.parse(p) for p in chosen]
    threads_before = torch.get_num_threads()
    passes: dict[str, list[dict[str, Any]]] = {name: [] for name in args.settings}
    started = time.perf_counter()
    for i in range(args.passes):
        for name in args.settings:
            print(f"pass {i + 1}/{args.passes}", file=sys.stderr)
            passes[name].append(bench_setting(name, args.threads, args.orders,
                                              [c == "on" for c in args.cache], extra, args.warmup,
                                              args.repeats, tuple(args.full_steps), args.width))
    torch.set_num_threads(threads_before)
    result: dict[str, Any] = {name: merge_passes(runs) for name, runs in passes.items()}
    result["meta"] = {**machine_info(), "threads_measured": args.threads, "steps": STEPS,
                      "warmup": args.warmup, "repeats": args.repeats, "passes": args.passes,
                      "alpha": ALPHA,
                      "width_override": args.width,
                      "headline": HEADLINE, "seconds": round(time.perf_counter() - started, 1),
                      "command": "simulations/benchmarks/lambda_speed.py " + " ".join(
                          a for a in (argv if argv is not None else sys.argv[1:]))}
    result["targets"] = targets(result, chosen)
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(result))
    for k, v in result["targets"].items():
        print(f"{'met ' if v['met'] else 'MISSED'} {k}: {v['speedup']}x")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
