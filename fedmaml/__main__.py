"""``python -m fedmaml``: the same as the ``fedmaml`` command."""

import sys

from fedmaml.cli import main

if __name__ == "__main__":
    sys.exit(main())
