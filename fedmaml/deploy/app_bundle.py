"""The Flower app that ``fedmaml deploy submit`` hands to ``flwr run``, from any directory.

``flwr run <dir>`` reads ``<dir>/pyproject.toml`` (``[project]``, ``[tool.flwr.app]``) and bundles
the files it names; run from anywhere but the fedmaml project directory it fails with "Failed to
load Flower App configuration". :func:`staged_app` writes that app into a temporary directory
instead: a ``pyproject.toml`` with the project's ``[tool.flwr.app]`` (publisher, components, the
run config generated from the schema) and a copy of the ``fedmaml`` package this command runs,
so what is submitted is the code the submitter has installed, wherever they are.

A user's own code named by the config (``model.name: "my_models:factory"``, ``model.loss``,
``algorithm.name``, a Flower task module ``data.flower_task``) goes with it when it is a module of the submitter's own files rather than an
installed package: :func:`user_code` finds it, and the bundle carries it beside ``fedmaml`` (Flower
puts the app's directory on ``sys.path`` of the ServerApp and of every ClientApp, so the devices
import it from the bundle). An installed package must be installed on the devices too.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import tomli_w

from fedmaml.version import __version__
from fedmaml.config.schema import Config
from fedmaml.deploy.flwr_config import app_config_toml
from fedmaml.user_objects import is_import_path

#: ``[tool.flwr.app]`` of the project's pyproject.toml (tests check that the two agree).
APP = {"publisher": "fedmaml", "fab-include": ["fedmaml/**/*.py"],
       "components": {"serverapp": "fedmaml.federated.server_app:app",
                      "clientapp": "fedmaml.federated.client_app:app"}}


def pyproject_text(include: Sequence[str] = ()) -> str:
    """The app's pyproject.toml; ``include``: more ``fab-include`` patterns (the user's code)."""
    app = {k: v for k, v in APP.items() if k != "components"}
    app["fab-include"] = [*APP["fab-include"], *include]
    head = tomli_w.dumps({
        "project": {"name": "fedmaml", "version": __version__,
                    "description": "fedmaml's Flower app (written by `fedmaml deploy submit`)",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": app}},
    })
    components = tomli_w.dumps({"tool": {"flwr": {"app": {"components": APP["components"]}}}})
    return head + "\n" + components + "\n" + app_config_toml()


def _installed(path: Path) -> bool:
    """Whether ``path`` lies in an installed-packages directory (site-packages and the like)."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return any(path.is_relative_to(Path(r).resolve()) for r in roots) or any(
        part in ("site-packages", "dist-packages") for part in path.parts)


def user_code(cfg: Config) -> list[Path]:
    """The top-level modules (``.py`` files) or packages (directories) of the user's own code that
    ``cfg`` names by import path, found as this process finds them: the ones to bundle. Installed
    packages, fedmaml itself and names that cannot be found are left out (the devices then import
    them as they can, and a missing one fails there with the import path)."""
    names = [path.split(":", 1)[0] for path in (cfg.model.name, cfg.model.loss, cfg.algorithm.name)
             if is_import_path(path)]
    if cfg.data.family == "flower" and cfg.data.flower_task:
        names.append(cfg.data.flower_task.split(":", 1)[0])
    found: list[Path] = []
    for top in dict.fromkeys(n.split(".", 1)[0] for n in names):
        if top == "fedmaml" or top in sys.builtin_module_names:
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:  # a package: its directory
            path = Path(next(iter(spec.submodule_search_locations))).resolve()
        elif spec.origin and spec.origin.endswith(".py"):
            path = Path(spec.origin).resolve()
        else:  # an extension module or a frozen one: not source to bundle
            continue
        if not _installed(path):
            found.append(path)
    return found


@contextmanager
def staged_app(user_paths: Sequence[Path] = ()) -> Iterator[Path]:
    """A temporary Flower app directory (named ``fedmaml``, a valid app name) for ``flwr run``,
    with ``user_paths`` (from :func:`user_code`) copied beside the ``fedmaml`` package."""
    with tempfile.TemporaryDirectory(prefix="fedmaml-app-") as tmp:
        app = Path(tmp) / "fedmaml"
        app.mkdir()
        include = []
        for path in user_paths:
            if path.is_dir():
                shutil.copytree(path, app / path.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                include.append(f"{path.name}/**/*.py")
            else:
                shutil.copy2(path, app / path.name)
                include.append(path.name)
        (app / "pyproject.toml").write_text(pyproject_text(include), encoding="utf-8")
        shutil.copytree(Path(__file__).resolve().parents[1], app / "fedmaml",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield app
