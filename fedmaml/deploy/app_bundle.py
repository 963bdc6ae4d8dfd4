"""The Flower app that ``fedmaml deploy submit`` hands to ``flwr run``, from any directory.

``flwr run <dir>`` reads ``<dir>/pyproject.toml`` (``[project]``, ``[tool.flwr.app]``) and bundles
the files it names; run from anywhere but the fedmaml project directory it fails with "Failed to
load Flower App configuration". :func:`staged_app` writes that app into a temporary directory
instead: a ``pyproject.toml`` with the project's ``[tool.flwr.app]`` (publisher, components, the
run config generated from the schema) and a copy of the ``fedmaml`` package this command runs,
so what is submitted is the code the submitter has installed, wherever they are.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomli_w

from fedmaml.version import __version__
from fedmaml.deploy.flwr_config import app_config_toml

#: ``[tool.flwr.app]`` of the project's pyproject.toml (tests check that the two agree).
APP = {"publisher": "fedmaml", "fab-include": ["fedmaml/**/*.py"],
       "components": {"serverapp": "fedmaml.federated.server_app:app",
                      "clientapp": "fedmaml.federated.client_app:app"}}


def pyproject_text() -> str:
    head = tomli_w.dumps({
        "project": {"name": "fedmaml", "version": __version__,
                    "description": "fedmaml's Flower app (written by `fedmaml deploy submit`)",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {k: v for k, v in APP.items() if k != "components"}}},
    })
    components = tomli_w.dumps({"tool": {"flwr": {"app": {"components": APP["components"]}}}})
    return head + "\n" + components + "\n" + app_config_toml()


@contextmanager
def staged_app() -> Iterator[Path]:
    """A temporary Flower app directory (named ``fedmaml``, a valid app name) for ``flwr run``."""
    with tempfile.TemporaryDirectory(prefix="fedmaml-app-") as tmp:
        app = Path(tmp) / "fedmaml"
        app.mkdir()
        (app / "pyproject.toml").write_text(pyproject_text(), encoding="utf-8")
        shutil.copytree(Path(__file__).resolve().parents[1], app / "fedmaml",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield app
