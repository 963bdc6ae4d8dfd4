"""The arguments and the handler of ``fedmaml tune`` (registered by fedmaml/cli.py). Standard
library only at import: the CLI builds every parser for ``fedmaml --help``."""

from __future__ import annotations

import argparse

from fedmaml.bundled import CONFIG_HELP

HELP = ("tune config values (step sizes...) over a search space: candidates on several seeds as "
        "vectorized batches, successive halving, a robust choice; writes the tuned config and a "
        "report (resumable)")
DEFAULT_SEEDS = "100,101"
EXIT_NO_CHOICE = 1  # a setting had no eligible candidate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help=f"{CONFIG_HELP}; optionally with a "
                        "`sweep:` section whose named settings are each tuned on their own")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config key of every trial, e.g. federated.rounds=2000")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                        help="a key to search (repeatable): KEY=log:LO:HI, KEY=lin:LO:HI, "
                        "KEY=int:LO:HI or KEY=V1,V2,... (values as --grid of fedmaml sweep reads "
                        "them); KEY may be a suffix (eta)")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, metavar="SEEDS",
                        help="seeds every candidate runs on, at least 2 (default: "
                        f"{DEFAULT_SEEDS}: seeds a reported table does not use)")
    parser.add_argument("--metric", default="unseen.loss.mean", metavar="KEY[@CLIENTS]",
                        help="the evaluation key to rank by (default: unseen.loss.mean); "
                        "KEY@IDS averages GROUP.METRIC over those client ids, e.g. "
                        "unseen.loss@30-49 (docs/tuning.md: measure on a validation set)")
    parser.add_argument("--direction", default="auto", choices=("auto", "min", "max"),
                        help="min or max the metric (auto: max for accuracies, else min)")
    parser.add_argument("--search", default="grid", choices=("grid", "random", "tpe"),
                        help="grid (every point), random, or tpe (Optuna: pip install "
                        "'fedmaml[tune]')")
    parser.add_argument("--trials", type=int, metavar="N",
                        help="budget: candidates per setting (random, tpe)")
    parser.add_argument("--batch", type=int, metavar="N", help="candidates asked and trained "
                        "as one computation at a time (default: the whole budget at once)")
    parser.add_argument("--grid-points", type=int, default=5, metavar="N",
                        help="grid search: values per log:/lin:/int: range (default 5)")
    parser.add_argument("--rungs", type=int, default=1, metavar="N",
                        help="successive halving with N rungs (1 = off): at each rung below the "
                        "last only the best 1/--reduction of the candidates go on")
    parser.add_argument("--reduction", type=float, default=3.0, metavar="F",
                        help="successive halving: keep the best 1/F at a rung (default 3)")
    parser.add_argument("--rise", type=float, default=1.2, metavar="F",
                        help="exclude a candidate whose final value is more than F x its best "
                        "after half the budget on any seed (default 1.2)")
    parser.add_argument("--sampler-seed", type=int, default=0, metavar="N",
                        help="seed of the random and TPE searches")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="processes training a rung's runs, each a vectorized batch of its "
                        "share (0 = one per CPU core; default 1)")
    parser.add_argument("--tune-dir", metavar="DIR",
                        help="directory of the tuning run (default: <output_dir>/<name>-tune)")
    parser.add_argument("--tuned-set", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the tuned config only, not in the trials (e.g. the "
                        "evaluation a final table reports: data.unseen_clients=5)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from fedmaml.bundled import resolve_config
    from fedmaml.config import parse_override, resolve_key
    from fedmaml.errors import ConfigError
    from fedmaml.sweep_spec import load_sweep, parse_seeds
    from fedmaml.tune.metric import parse_metric
    from fedmaml.tune.space import parse_space
    from fedmaml.tune.tuner import Tuner, TuneSpec

    base, sweep = load_sweep(resolve_config(args.config), args.overrides)
    if sweep.grid:
        raise ConfigError(f"{args.config}: its sweep section has a grid "
                          f"({', '.join(sweep.grid)}); fedmaml tune searches --space instead: "
                          "give those values there")
    tuned_set = {}
    for text in args.tuned_set:
        key, value = parse_override(text)
        tuned_set[resolve_key(key, [value])] = value
    spec = TuneSpec(space=parse_space(args.space), seeds=parse_seeds(args.seeds),
                    metric=parse_metric(args.metric, args.direction), search=args.search,
                    trials=args.trials, batch=args.batch, grid_points=args.grid_points,
                    rungs=args.rungs, reduction=args.reduction, rise=args.rise,
                    sampler_seed=args.sampler_seed, tuned_set=tuned_set,
                    settings=sweep.settings)
    if args.search == "tpe":
        from fedmaml.tune.search import require_optuna

        require_optuna()  # before anything trains
    from fedmaml.sweep import resolve_jobs

    jobs = resolve_jobs(args.jobs, base)
    result = Tuner(base, spec, args.tune_dir, quiet=args.quiet, jobs=jobs).run()
    for s in result.settings:
        where = f"{s.setting}: " if s.setting else ""
        print(f"{where}{s.choice.describe()}")
        if s.tuned_path is not None:
            print(f"{where}tuned config: {s.tuned_path}")
    print(f"report: {result.report} ({result.seconds / 60:.1f} min in all)")
    return EXIT_NO_CHOICE if any(s.choice.chosen is None for s in result.settings) else 0
