"""Lambda patterns: which layer groups each adaptation step updates (Khabarlak, arXiv 2206.05930).

A pattern is a binary matrix with one row per adaptation step and one column per layer group
(input side first). Textual form, used in configs and on the command line:

* rows of bits joined by ``|``, e.g. ``1111|0001`` (step 1 updates all four groups, step 2 only the
  head);
* a row may carry a repeat count: ``0001x5`` is five head-only steps; ``1111|0001x4`` is "one full
  step, then four head-only steps";
* ``none`` is the pattern with no steps (no adaptation);
* the aliases ``full`` (MAML), ``head`` (ANIL) and ``body`` (BOIL) expand, given the model's groups and
  a step count, to all-ones, ``0...01`` and ``1...10`` at every step.

``str(pattern)`` is the canonical form (consecutive equal rows merged, ``x1`` omitted), and
``Pattern.parse(str(p)) == p`` for every pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from fedmaml.errors import PatternError

_SEGMENT = re.compile(r"^([01]+)(?:x([1-9][0-9]*))?$")
ALIASES = ("full", "head", "body")


@dataclass(frozen=True)
class Pattern:
    """An immutable Lambda pattern: ``rows[s][l]`` is 1 when step ``s`` updates group ``l``."""

    rows: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        widths = {len(r) for r in self.rows}
        if len(widths) > 1:
            raise PatternError(f"pattern rows have different lengths {sorted(widths)}; every row "
                               "needs one bit per layer group")
        if widths == {0}:
            raise PatternError("pattern rows must have at least one bit")
        for r in self.rows:
            if any(b not in (0, 1) for b in r):
                raise PatternError(f"pattern row {r} is not binary; use only 0 and 1")
        # Normalise (lists, bools, ...) to tuples of ints: hashable, and equal to the parsed form.
        object.__setattr__(self, "rows", tuple(tuple(int(b) for b in r) for r in self.rows))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Parse the explicit textual form (no aliases; see :func:`resolve_pattern`)."""
        src = text.strip()
        if src == "none":
            return cls(())
        if not src:
            raise PatternError("empty pattern; write rows of bits such as '1111|0001x4', or 'none' "
                               "for no adaptation")
        rows: list[tuple[int, ...]] = []
        for segment in src.split("|"):
            m = _SEGMENT.match(segment.strip())
            if not m:
                raise PatternError(
                    f"bad pattern segment {segment!r} in {text!r}: a segment is a row of bits "
                    "(e.g. '0011') with an optional repeat count 'xN' (e.g. '0001x4'); segments "
                    "are joined by '|'")
            bits = tuple(int(c) for c in m.group(1))
            rows.extend([bits] * int(m.group(2) or 1))
        return cls(tuple(rows))

    @classmethod
    def uniform(cls, row: Sequence[int], steps: int) -> "Pattern":
        return cls((tuple(int(b) for b in row),) * steps)

    @classmethod
    def full(cls, num_groups: int, steps: int) -> "Pattern":
        return cls.uniform([1] * num_groups, steps)

    @classmethod
    def top(cls, num_groups: int, k: int, steps: int) -> "Pattern":
        """Adapt the top ``k`` groups (nearest the output) at every step; ``k = 1`` is ANIL."""
        return cls.uniform([0] * (num_groups - k) + [1] * k, steps)

    # -- queries --------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.rows)

    @property
    def num_groups(self) -> int | None:
        return len(self.rows[0]) if self.rows else None

    def adapted(self, step: int) -> tuple[int, ...]:
        """Indices of the groups that ``step`` updates."""
        return tuple(i for i, b in enumerate(self.rows[step]) if b)

    def lowest_adapted_from(self, step: int) -> int | None:
        """The lowest group any step ``>= step`` updates; groups below it are final from ``step`` on."""
        lows = [a[0] for a in (self.adapted(s) for s in range(step, self.steps)) if a]
        return min(lows) if lows else None

    def __str__(self) -> str:
        if not self.rows:
            return "none"
        out: list[str] = []
        i = 0
        while i < len(self.rows):
            j = i
            while j + 1 < len(self.rows) and self.rows[j + 1] == self.rows[i]:
                j += 1
            bits = "".join(map(str, self.rows[i]))
            out.append(bits if j == i else f"{bits}x{j - i + 1}")
            i = j + 1
        return "|".join(out)

    def validate(self, group_names: Sequence[str], model_name: str = "model") -> "Pattern":
        """Check the pattern has one bit per layer group of the model; return it for chaining."""
        if self.rows and self.num_groups != len(group_names):
            raise PatternError(
                f"pattern '{self}' has {self.num_groups} bits per row but {model_name} has "
                f"{len(group_names)} layer groups {list(group_names)}; write one bit per group, "
                "input side first")
        return self


def is_alias(text: str) -> bool:
    """Whether a config's pattern text is an alias, which takes its step count from a steps key
    (``algorithm.inner_steps``, ``evaluation.steps``...); written-out text has its own."""
    return text.strip() in ALIASES


def pattern_steps(text: str, steps: int) -> int:
    """The adaptation steps a config's pattern text runs, as :func:`resolve_pattern` resolves it:
    ``steps`` for an alias, the rows of written-out text (``0001`` is one step, whatever
    ``steps`` says; ``0001x5`` five)."""
    return steps if is_alias(text) else Pattern.parse(text).steps


def resolve_pattern(text: str | Pattern, group_names: Sequence[str], steps: int,
                    model_name: str = "model") -> Pattern:
    """Turn a config string (explicit form or an alias) into a pattern validated for a model."""
    if isinstance(text, Pattern):
        return text.validate(group_names, model_name)
    name = text.strip()
    n = len(group_names)
    if name == "full":
        return Pattern.full(n, steps)
    if name == "head":
        return Pattern.top(n, 1, steps)
    if name == "body":
        if n < 2:
            raise PatternError(f"'body' needs at least two layer groups; {model_name} has "
                               f"{list(group_names)}")
        return Pattern.uniform([1] * (n - 1) + [0], steps)
    try:
        return Pattern.parse(name).validate(group_names, model_name)
    except PatternError as e:
        msg = str(e)
        if "bad pattern segment" in msg and not set(name) <= set("01x|0123456789 "):
            msg += f"; or one of the aliases {list(ALIASES)} / 'none'"
        if str(list(group_names)) not in msg:  # every pattern error names the model's groups
            msg += f" ({model_name} has {n} layer groups {list(group_names)}, input side first)"
        raise PatternError(msg) from None
