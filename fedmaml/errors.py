"""User-facing errors.

Anything a user can fix (a config key, a pattern, a data file, a peer's message) raises a subclass of
:class:`FedmamlError` whose message names the key or file, the bad value and what is allowed. The CLI
prints these without a traceback; everything else is a bug and keeps its traceback.
"""


class FedmamlError(Exception):
    """Base class of errors caused by user input."""


class ConfigError(FedmamlError, ValueError):
    """A configuration key has a bad name, type or value."""


class PatternError(FedmamlError, ValueError):
    """A Lambda pattern is malformed or does not fit the model's layer groups."""


class DataError(FedmamlError, ValueError):
    """A data file or data set is missing, malformed or of the wrong shape."""


class MessageError(FedmamlError, ValueError):
    """A message from a federated peer is malformed."""
