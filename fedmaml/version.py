"""The version of fedmaml, in a module of its own so that anything can read it without importing
the package's Python API (fedmaml/__init__.py)."""

__version__ = "0.1.0"
