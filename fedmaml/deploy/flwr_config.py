"""The TOML files Flower reads, written from fedmaml's config schema.

* :func:`app_config_toml`: the ``[tool.flwr.app.config]`` section of ``pyproject.toml`` -- every
  schema key with its default, so ``flwr run .`` accepts any key as a ``--run-config`` override.
  :func:`update_pyproject` rewrites that section in place (a test checks that it matches the schema).
* :func:`run_config_toml`: a fedmaml YAML config (plus overrides) as a flat run-config file for
  ``flwr run . <connection> --run-config <file>``: the same experiment as ``fedmaml run`` would start.
* :func:`write_connection`: a named SuperLink connection in ``$FLWR_HOME/config.toml`` (default
  ``~/.flwr``), where the ``flwr`` CLI looks up the address and the CA certificate.

Run-config values are scalars; list keys are written as "40,40" strings (see
:func:`fedmaml.config.config_to_flat`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedmaml.atomic import atomic_write_text
from fedmaml.config.schema import Config
from fedmaml.deploy.crypto import DeployError

APP_CONFIG_HEADER = "[tool.flwr.app.config]"
_NOTE = ("# Every key of fedmaml's config schema with its default (override with\n"
         "# `flwr run . --run-config 'key=value ...'`). Generated: do not edit by hand, run\n"
         "# `fedmaml deploy app-config --update pyproject.toml` after changing fedmaml/config/schema.py.\n")


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _toml_key(key: str) -> str:
    # Dotted keys (data.num_clients) are nested tables in TOML, which Flower flattens back to
    # "data.num_clients": written bare, the section reads like the YAML configs.
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else _toml_value(key)


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section (header, note and one line per schema key)."""
    from fedmaml.config import Config, config_to_flat

    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in config_to_flat(Config()).items()]
    return APP_CONFIG_HEADER + "\n" + _NOTE + "\n".join(lines) + "\n"


def flat_app_config(pyproject: str | Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of a pyproject.toml as Flower sees it (flat dotted keys)."""
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    section = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if section is None:
        raise DeployError(f"{pyproject} has no {APP_CONFIG_HEADER} section")
    return _flatten(section)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def update_pyproject(pyproject: str | Path) -> bool:
    """Replace (or append) the ``[tool.flwr.app.config]`` section; True when the file changed.

    The section runs from its header to the next table header (or the end of the file), so the
    sections around it are kept byte for byte.
    """
    path = Path(pyproject)
    text = path.read_text(encoding="utf-8")
    section = app_config_toml()
    start = text.find("\n" + APP_CONFIG_HEADER + "\n")
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        start += 1
        following = re.search(r"^\[", text[start + len(APP_CONFIG_HEADER):], flags=re.M)
        end = start + len(APP_CONFIG_HEADER) + following.start() if following else len(text)
        rest = text[end:]
        new = text[:start] + section + ("\n" + rest if rest else "")
    if new == text:
        return False
    atomic_write_text(path, new)
    return True


def run_config_toml(cfg: Config) -> str:
    """A complete flat run config for ``flwr run --run-config FILE``: every key, so the run does not
    depend on pyproject defaults. A relative ``output_dir`` is made absolute here, because the
    ServerApp runs in the SuperLink's working directory, not the submitter's."""
    from fedmaml.config import config_to_flat

    flat = config_to_flat(cfg)
    out = Path(str(flat["output_dir"])).expanduser()
    flat["output_dir"] = str(out if out.is_absolute() else Path.cwd() / out)
    header = (f"# fedmaml run config for `flwr run . <connection> --run-config <this file>`\n"
              f"# experiment {cfg.name!r}; the run directory is <output_dir>/{cfg.name}-<run id> "
              "on the SuperLink's machine.\n")
    return header + "\n".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in flat.items()) + "\n"


def flwr_home() -> Path:
    """Where the ``flwr`` CLI keeps its config.toml: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def read_flwr_config(path: Path) -> dict[str, Any]:
    """The ``flwr`` CLI's ``config.toml`` as it reads it: Flower's own default file while there is
    none yet (``flwr`` writes it at its first use, with its "local" simulation connection)."""
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    text = path.read_text(encoding="utf-8") if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeployError(f"{path} is not valid TOML ({e}); fix or move it away") from None


def check_connection(name: str | None, given: str, home: str | Path | None = None) -> None:
    """Refuse a SuperLink connection the ``flwr`` CLI does not have (``given``: how the user named
    it, e.g. ``--connection``), listing those it has and how to add one; ``flwr`` itself only says
    that it is not found. None: the default connection, which ``flwr`` resolves."""
    if name is None:
        return
    home = Path(home).expanduser() if home is not None else flwr_home()
    path = home / "config.toml"
    links = read_flwr_config(path).get("superlink", {})
    names = sorted(n for n, entry in links.items() if isinstance(entry, Mapping))
    if name in names:
        return
    default = links.get("default")
    have = ", ".join(f"{n} (the default)" if n == default else n for n in names) or "none"
    where = path if path.exists() else f"{path} (not written yet: flwr's defaults)"
    raise DeployError(f"{given} {name!r}: no such SuperLink connection in {where}; it has: {have}. "
                      f"Add it with `fedmaml deploy connection {name} --address HOST:PORT --ca "
                      "ca.crt` (the SuperLink's Control API; --insecure instead of --ca for one "
                      "without TLS), or give one of those")


def write_connection(name: str, address: str, ca: str | Path | None, *, insecure: bool = False,
                     default: bool = False, home: str | Path | None = None,
                     token_file: str | Path | None = None) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``<home>/config.toml``; returns the file.
    ``token_file``: the SuperLink's operator token, stored where ``flwr`` sends it from
    (:func:`fedmaml.deploy.operator_token.store_for_flwr`)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeployError(f"connection name {name!r}: use letters, digits, '-' and '_' only")
    if "://" in address or ":" not in address:
        raise DeployError(f"--address {address!r}: expected HOST:PORT without a scheme, "
                          "e.g. 127.0.0.1:9093 (the Control API listens on the "
                          "server's loopback; from another machine, through an SSH tunnel)")
    if insecure == (ca is not None):
        raise DeployError("give exactly one of --ca CA_CERT (TLS, the default) and --insecure")
    home = Path(home).expanduser() if home is not None else flwr_home()
    path = home / "config.toml"
    data = read_flwr_config(path)
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if ca is not None:
        ca = Path(ca).expanduser().resolve()
        if not ca.is_file():
            raise DeployError(f"--ca {ca}: file not found (the ca.crt of `fedmaml deploy certs`)")
        entry["root-certificates"] = str(ca)
    else:
        entry["insecure"] = True
    links[name] = entry
    if default:
        links["default"] = name
    token = None
    if token_file is not None:  # read first: a bad token file leaves config.toml unchanged
        from fedmaml.deploy.operator_token import read_token

        token = read_token(token_file)
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tomli_w.dumps(data))
    if token is not None:
        from fedmaml.deploy.operator_token import store_for_flwr

        store_for_flwr(home, address, token)
    return path
