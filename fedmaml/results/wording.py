"""Counts in words, for the messages, tables and reports a user reads."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``, ``0 runs`` (``noun`` in the singular, made plural with an ``s``)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
