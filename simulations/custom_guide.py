"""docs/custom.md's guide from zero to a figure, both parts: a user's CNN on image files
(simulations/custom_images.py) and a regression from a CSV table (simulations/custom_tabular.py),
each ending in a ``fedmaml compare`` figure and table under ``--out``.

    PYTHONPATH=. python simulations/custom_guide.py            # both, full length (a few minutes)
    PYTHONPATH=. python simulations/custom_guide.py --short    # both, a few rounds each (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _script(name: str):
    """A sibling script as a module (simulations/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/custom_guide", help="output directory")
    parser.add_argument("--short", action="store_true", help="a few rounds each (a smoke test)")
    args = parser.parse_args(argv)
    short = ["--short"] if args.short else []
    out = Path(args.out)
    for name, sub in (("custom_images", "images"), ("custom_tabular", "tabular")):
        code = _script(name).main([*short, "--out", str(out / sub)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
