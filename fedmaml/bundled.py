"""The example configs shipped with fedmaml, and finding a config file by name.

The examples live in the top-level ``configs/`` directory of a checkout; ``fedmaml/configs`` is a
symlink to it, so the same files are package data in the wheel (pyproject.toml) and a user who
installed with pip can run ``fedmaml run quickstart`` or ``fedmaml sweep sweeps/moml_miniature``
from any directory. Standard library only: the CLI resolves names before importing torch.
"""

import difflib
from pathlib import Path

from fedmaml.errors import ConfigError

#: Where the bundled configs are: inside the package (a symlink to configs/ in a checkout).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_SUFFIXES = (".yaml", ".yml")


def bundled_names() -> list[str]:
    """Names of the bundled configs, as ``fedmaml run`` accepts them: ``quickstart``,
    ``sweeps/moml_miniature``... (relative to :data:`CONFIG_DIR`, without ``.yaml``)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for p in CONFIG_DIR.rglob("*.yaml") if p.is_file())


#: The help of a command's config argument, which :func:`resolve_config` reads.
CONFIG_HELP = ("YAML config file, or the name of a bundled example: quickstart, "
               "sweeps/moml_miniature... (an unknown name lists them)")


def resolve_config(text: str | Path) -> Path:
    """The config file that ``text`` names: an existing file wins; otherwise a bundled config
    (``quickstart``, ``quickstart.yaml``, ``sweeps/memory``). Anything else is a
    :class:`ConfigError` that lists the bundled names. A *directory* of that name (``results/``
    holding a run called ``quickstart``) does not hide the bundled config."""
    path = Path(text)
    if path.is_file():
        return path
    name = path.as_posix()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    names = bundled_names()
    # Looked up in the list rather than joined to CONFIG_DIR: `../x` cannot escape the directory.
    if name in names:
        return CONFIG_DIR / f"{name}.yaml"
    listing = ", ".join(names) if names else "none (the package's configs directory is missing)"
    directory = "a directory, " if path.is_dir() else ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    raise ConfigError(f"config file not found: {text} ({directory}nor a bundled config of that "
                      f"name; bundled configs: {listing})"
                      + (f"; did you mean {close[0]!r}?" if close else ""))
