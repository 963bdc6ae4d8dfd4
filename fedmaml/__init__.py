"""fedmaml: memory-based federated meta-learning with Lambda-pattern adaptation."""

from fedmaml.version import __version__

__all__ = ["__version__", "run"]


def run(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Run an experiment from Python, optionally with your own ``torch.nn.Module``
    (:func:`fedmaml.api.run`; imported on first use so ``import fedmaml`` stays light)."""
    from fedmaml.api import run as _run

    return _run(*args, **kwargs)
