"""Sub-commands defined outside cli.py register themselves on import (``cli.build_parser`` imports this)."""

from segany.evaluation import run as _eval  # noqa: F401
