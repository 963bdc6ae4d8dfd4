"""Imports point down: the import-linter contracts of pyproject.toml (``[tool.importlinter]``: the
layers, no cycles within a package, the config package's modules by job, the math without flwr or
ray) hold for fedmaml, and they do catch a violation: the same contracts fail on a copy of the
package with upward, cyclic and Flower imports and an unplaced config module added (lazy imports,
inside functions, as grimp sees them).

import-linter is in the ``test`` extra; the layers are drawn in docs/architecture.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("importlinter", reason="import-linter is in the test extra")

# The CLI's entry point, run in a fresh interpreter: grimp builds the graph of the package found on
# PYTHONPATH, which must be the copy under test, not the fedmaml this process has imported.
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint(project: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on ``project`` (its pyproject.toml and its fedmaml/), without a cache."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fedmaml_keeps_its_import_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout, result.stdout


def _add_function(path: Path, body: str) -> None:
    """Append a function holding ``body`` (a lazy import) to a module of the copy."""
    with path.open("a", encoding="utf-8") as f:
        f.write("\n\ndef _added_by_the_test():\n    " + body + "\n")


def test_the_contracts_catch_upward_cyclic_and_flower_imports(tmp_path):
    shutil.copytree(ROOT / "fedmaml", tmp_path / "fedmaml",
                    ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "py.typed"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pkg = tmp_path / "fedmaml"
    assert lint(tmp_path).returncode == 0  # the copy itself is clean

    _add_function(pkg / "core" / "params.py", "from fedmaml.engines import memory_bank")  # upward
    _add_function(pkg / "algorithms" / "base.py", "import flwr.app")  # Flower in the math
    _add_function(pkg / "results" / "compare.py",  # compare_plots imports compare: a cycle
                  "from fedmaml.results.compare_plots import plot_convergence")
    # validation climbing to the reference generator (not a cycle: only the layers catch it), and
    # a config module without a layer (the contract is exhaustive)
    _add_function(pkg / "config" / "validate.py",
                  "from fedmaml.config.reference import config_reference_markdown")
    (pkg / "config" / "stray.py").write_text('"""A module the contract does not place."""\n')
    result = lint(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "0 kept, 4 broken" in out, out
    assert "fedmaml.core is not allowed to import fedmaml.engines" in out, out
    assert "fedmaml.core.params -> fedmaml.engines.memory_bank" in out, out
    assert "fedmaml.algorithms.base -> flwr (l." in out, out  # external packages as one node
    assert "No cycles are allowed in fedmaml.results" in out, out
    assert "fedmaml.config.validate is not allowed to import fedmaml.config.reference" in out, out
    assert "fedmaml.config.stray" in out, out
