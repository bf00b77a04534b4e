"""Sub-commands defined outside cli.py register themselves on import (``cli.build_parser`` imports this)."""

from segany.automatic import run as _everything  # noqa: F401
from segany.engine import cli as _engine  # noqa: F401
from segany.evaluation import run as _eval  # noqa: F401
from segany.serve import cli as _serve  # noqa: F401  (serve, export-onnx)
from segany.training import cli as _train  # noqa: F401
