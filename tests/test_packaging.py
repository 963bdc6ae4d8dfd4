"""Packaging and provenance (docs/results.md, "Where the numbers came from"): declared
dependencies, the bundled example configs and finding them by name, a wheel installed into a fresh
environment running the quickstart outside the checkout, the version and commit recorded with
every result, and a documented short run reproduced bit for bit."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from fedmaml import __version__
from fedmaml.bundled import CONFIG_DIR, bundled_names, resolve_config
from fedmaml.cli import main
from fedmaml.errors import ConfigError
from fedmaml.provenance import git_state, provenance

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What the tests outside this file run with; a fresh environment must not inherit the checkout.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) of each absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], id(node) not in nested) for n in names]
    return found


def test_every_imported_package_is_declared_and_optional_ones_are_lazy() -> None:
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_name(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values()
              for r in reqs}
    dists = packages_distributions()
    problems = []
    for path in sorted((ROOT / "fedmaml").rglob("*.py")):
        for module, top_level in _imports(path):
            if module in sys.stdlib_module_names or module == "fedmaml":
                continue
            names = {_name(d) for d in dists.get(module, [])}
            where = path.relative_to(ROOT)
            if not names:
                problems.append(f"{where}: imports {module}, which no installed distribution "
                                "provides")
            elif not names & (core | extras):
                problems.append(f"{where}: imports {module} ({', '.join(sorted(names))}), "
                                "declared nowhere in pyproject.toml")
            elif top_level and not names & core:
                problems.append(f"{where}: imports the optional {module} at module level (an "
                                "extra must be imported where it is used, with a clear error)")
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_py_typed_and_every_example_config_are_in_the_package() -> None:
    assert (ROOT / "fedmaml" / "py.typed").is_file()
    assert CONFIG_DIR.resolve() == (ROOT / "configs").resolve()  # one copy: the symlink
    on_disk = sorted(p.relative_to(ROOT / "configs").with_suffix("").as_posix()
                     for p in (ROOT / "configs").rglob("*.yaml"))
    assert bundled_names() == on_disk
    assert {"quickstart", "sweeps/moml_miniature"} <= set(on_disk)
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["fedmaml"]
    # Written twice (flwr run reads a static project.version): provenance reports the package's.
    assert PYPROJECT["project"]["version"] == __version__


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("quickstart", "quickstart.yaml", "sweeps/moml_miniature",
                 "sweeps/moml_miniature.yml"):
        stem = name.rsplit(".", 1)[0] if name.endswith((".yaml", ".yml")) else name
        assert resolve_config(name) == CONFIG_DIR / f"{stem}.yaml"
    assert main(["config", "show", "quickstart", "federated.rounds=7"]) == 0
    shown = capsys.readouterr().out
    assert "name: quickstart" in shown and "rounds: 7" in shown
    # An existing path wins over the bundled config of the same name.
    (tmp_path / "quickstart.yaml").write_text("name: mine\n", encoding="utf-8")
    assert resolve_config("quickstart.yaml") == Path("quickstart.yaml")
    assert main(["config", "show", "quickstart.yaml"]) == 0
    assert "name: mine" in capsys.readouterr().out
    assert main(["config", "show", "quickstart"]) == 0  # no file of that exact name: bundled
    assert "name: quickstart" in capsys.readouterr().out
    # A directory of that name (e.g. inside results/, a run called quickstart) is not a config.
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "sweeps" / "moml_miniature").mkdir(parents=True)
    assert resolve_config("quickstart") == CONFIG_DIR / "quickstart.yaml"
    assert resolve_config("sweeps/moml_miniature") == CONFIG_DIR / "sweeps/moml_miniature.yaml"
    assert main(["config", "show", "quickstart"]) == 0
    assert "name: quickstart" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"config file not found: other \(a directory, nor a bundled"):
        resolve_config("other")


def test_an_unknown_config_name_lists_the_bundled_ones(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in ("quikstart", "../configs/quickstart", "sweeps/nope.yaml"):
        with pytest.raises(ConfigError) as e:
            resolve_config(bad)
        assert f"not found: {bad} " in str(e.value) and "quickstart, " in str(e.value)
        assert "sweeps/moml_miniature" in str(e.value)
    assert main(["run", "quikstart"]) == 2
    err = capsys.readouterr().err
    assert "not found: quikstart " in err and "bundled configs:" in err
    assert "sinewave_centralized" in err and err.rstrip().endswith("did you mean 'quickstart'?")
    assert main(["sweep", "nope", "--dry-run"]) == 2
    assert "bundled configs:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_reads_commit_and_dirty_tree_of_the_checkout(tmp_path) -> None:
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    repo = package.parent
    assert git_state(package) == (None, None)  # not a checkout: an installed wheel
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    commit = _git(repo, "rev-parse", "HEAD")
    assert git_state(package) == (commit, False)
    (package / "notes.txt").write_text("untracked\n")  # results and notes: not "dirty"
    assert git_state(package) == (commit, False)
    (package / "a.py").write_text("x = 2\n")
    assert git_state(package) == (commit, True)
    # A package inside a subdirectory of some other repository is not that repository's code.
    nested = repo / "venv" / "site-packages" / "pkg"
    nested.mkdir(parents=True)
    assert git_state(nested) == (None, None)


def test_provenance_of_this_checkout_and_a_run_summary(tmp_path) -> None:
    record = provenance()
    assert record["fedmaml_version"] == __version__
    assert {"python", "torch", "numpy", "flwr"} <= set(record)
    if (ROOT / ".git").exists() and shutil.which("git"):
        assert record["git_commit"] == _git(ROOT, "rev-parse", "HEAD")
        assert isinstance(record["git_dirty"], bool)
    import torch

    from fedmaml.config import load_config
    from fedmaml.results.recorder import RunRecorder, read_summary

    recorder = RunRecorder(tmp_path / "run", load_config(None))
    recorder.finish({"status": "completed"}, {"w": torch.zeros(2)})
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["provenance"] == record
    from fedmaml.federated.pattern_selection import write_selection

    selection = json.loads(write_selection(tmp_path / "sel", {"chosen": "0001"}).read_text())
    assert selection == {"chosen": "0001", "provenance": record}


# --------------------------------------------------------------------------------------------------
# A real wheel in a fresh environment, and the documented short run
# --------------------------------------------------------------------------------------------------

def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel offline from a copy of the project's files (the build writes build/ and
    *.egg-info next to pyproject.toml: not into the checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("fedmaml", "configs"):  # symlinks=True: fedmaml/configs stays the link it is
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "-w", str(dist), str(source)], check=True,
                   env=CLEAN_ENV, cwd=tmp_path)
    (wheel,) = dist.glob("fedmaml-*.whl")
    return wheel


def _fresh_env(tmp_path: Path) -> Path:
    """A new venv without pip or packages of its own that sees this environment's installed
    dependencies (a path line in a .pth file: no network, no copies). Returns its python."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, env=CLEAN_ENV).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # The shared packages come after the new environment's own site-packages, so the wheel's
    # fedmaml wins over an editable install of the checkout (whose finder, a .pth file of that
    # directory, is not run for a directory added this way).
    Path(site, "shared-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_runs_the_quickstart(tmp_path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"fedmaml-{__version__}.dist-info/METADATA").decode()
    assert "fedmaml/py.typed" in names
    assert {f"fedmaml/configs/{n}.yaml" for n in bundled_names()} <= names
    for dist in ("cryptography", "tomli-w", "uvicorn", "pillow", "ray"):
        assert re.search(rf"^Requires-Dist: {dist}\b", metadata, re.M), dist
    assert "Project-URL: Repository, https://github.com/fedmaml/fedmaml" in metadata

    python = _fresh_env(tmp_path)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
                   check=True, env=CLEAN_ENV)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=CLEAN_ENV)
    assert check.returncode == 0, check.stdout + check.stderr

    elsewhere = tmp_path / "elsewhere"  # not the checkout, no configs/ directory
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import fedmaml; print(fedmaml.__file__)"],
                           cwd=elsewhere, env=CLEAN_ENV, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    fedmaml = python.parent / "fedmaml"  # the console script
    shown = subprocess.run([str(fedmaml), "config", "show", "quickstart"], cwd=elsewhere,
                           env=CLEAN_ENV, check=True, capture_output=True, text=True).stdout
    assert "name: quickstart" in shown
    subprocess.run([str(fedmaml), "run", "quickstart", "federated.rounds=4",
                    "federated.eval_every=2", "compare_with=", "--quiet"], cwd=elsewhere,
                   env=CLEAN_ENV, check=True)
    summary = json.loads((elsewhere / "results" / "quickstart" / "summary.json").read_text())
    assert summary["status"] == "completed"
    # Installed from a wheel: the version only, no commit.
    assert summary["provenance"]["fedmaml_version"] == __version__
    assert summary["provenance"]["git_commit"] is None


@pytest.mark.slow
def test_the_documented_short_run_reproduces_bit_for_bit(tmp_path) -> None:
    """docs/results.md, "Reproducing a documented run": the numbers of
    docs/results/short_run.json, re-run with this code. Bitwise on the platform that wrote them
    (torch build and CPU instruction set); elsewhere torch's kernels may round differently, so
    the numbers are compared to 1e-5 and the model digest is not."""
    script = ROOT / "simulations" / "reproduce_short_run.py"
    out = tmp_path / "short_run.json"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    documented = json.loads((ROOT / "docs" / "results" / "short_run.json").read_text())
    rerun = json.loads(out.read_text())
    assert rerun["command"] == documented["command"]
    assert rerun["status"] == documented["status"] == "completed"
    same_platform = (rerun["platform"] == documented["platform"]
                     and rerun["provenance"]["torch"] == documented["provenance"]["torch"])
    for when in ("before", "after"):
        assert set(rerun[when]) == set(documented[when])
        if same_platform:
            assert rerun[when] == documented[when]
        else:  # client ids exactly, numbers to 1e-5
            for key, value in documented[when].items():
                expected = value if isinstance(value, list) else pytest.approx(value, rel=1e-5,
                                                                                 abs=1e-8)
                assert rerun[when][key] == expected, key
    if same_platform:
        assert rerun["model_sha256"] == documented["model_sha256"]
