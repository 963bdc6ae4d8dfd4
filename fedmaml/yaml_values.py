"""Exponent floats in free-form mappings: ``1e-5`` read as the number it is.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-5``): ``1e-5`` is text. A typed key
converts it back (``algorithm.eta: 1e-5`` is a float) and keeps the text as written for run names,
but an entry of a free-form mapping (``algorithm.kwargs.lam``) has no type to do so. Such a mapping
is kept as JSON text (fedmaml/config/values.py), and its entries that read as exponent floats are
stored as those numbers, as YAML 1.2 and JSON read them: a quoted ``'1e3'`` too (an entry meant
as the text ``1e3`` is not told apart)."""

from __future__ import annotations

import re
from typing import Any

#: A float with an exponent, with or without a dot, with at least one digit before the exponent.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


def exponents_as_numbers(value: Any) -> Any:
    """``value`` with every text that is an exponent float (``'1e-5'``, as YAML 1.1 left it)
    turned into that float, in lists and mappings too."""
    if isinstance(value, str) and EXPONENT_FLOAT.match(value.strip()):
        return float(value.replace("_", ""))
    if isinstance(value, dict):
        return {k: exponents_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exponents_as_numbers(v) for v in value]
    return value
