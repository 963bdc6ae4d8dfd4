"""fedmaml: memory-based federated meta-learning with Lambda-pattern adaptation.

``fedmaml.run`` runs an experiment from Python (:func:`fedmaml.api.run`, docs/custom.md "The Python
API"). It is imported on first use, so that ``import fedmaml`` stays light (the CLI's help, a
sweep's parent process), and it is the function itself: ``help(fedmaml.run)`` shows its arguments.
"""

from typing import TYPE_CHECKING, Any

from fedmaml.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time, __getattr__ below
    from fedmaml.api import run

__all__ = ["__version__", "run"]


def __getattr__(name: str) -> Any:
    """``fedmaml.run``: :func:`fedmaml.api.run`, imported when first asked for (PEP 562)."""
    if name == "run":
        from fedmaml.api import run

        globals()["run"] = run  # asked once: then an ordinary attribute
        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
