"""YAML as fedmaml reads values: PyYAML's safe loader, with ``1e-5`` read as a number.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-5``): ``1e-5`` is text. A typed key
converts it back (``algorithm.eta: 1e-5`` is a float), but an entry of a free-form mapping
(``algorithm.kwargs.lam``) has no type to do so, and ``json.dumps`` writes ``1e-05``. This loader
reads them as YAML 1.2 and JSON do: numbers."""

from __future__ import annotations

import re
from typing import Any

import yaml


class ValueLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-5``, ``2E10``)."""


#: A float with an exponent, with or without a dot (YAML 1.2 and JSON read all of these).
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")

ValueLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT,
                                  list("-+0123456789."))


def load_value(text: str) -> Any:
    """``text`` read as YAML by :class:`ValueLoader`."""
    return yaml.load(text, Loader=ValueLoader)


def exponents_as_numbers(value: Any) -> Any:
    """``value`` with every text that is an exponent float (``'1e-5'``, as YAML 1.1 left it)
    turned into that float, in lists and mappings too: for the entries of a free-form mapping,
    which have no type that would convert them."""
    if isinstance(value, str) and EXPONENT_FLOAT.match(value.strip()):
        return float(value.replace("_", ""))
    if isinstance(value, dict):
        return {k: exponents_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exponents_as_numbers(v) for v in value]
    return value
