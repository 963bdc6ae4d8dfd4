"""fedmaml: memory-based federated meta-learning with Lambda-pattern adaptation."""

__version__ = "0.1.0"
