"""Options and argument parsing that several commands share."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from segany.errors import SegAnyError


def parse_xy(text: str, what: str = "point") -> tuple[float, float]:
    """``"X,Y"`` -> floats, with a clear message for anything else."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise SegAnyError(f"invalid {what} {text!r}: expected X,Y (two numbers separated by a comma)") from None
    if not (abs(x) < float("inf") and abs(y) < float("inf")):
        raise SegAnyError(f"invalid {what} {text!r}: coordinates must be finite numbers")
    return x, y


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"X0,Y0,X1,Y1"`` -> floats; the box must have a positive width and height."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise SegAnyError(f"invalid box {text!r}: expected X0,Y0,X1,Y1 (four numbers)") from None
    if not all(abs(v) < float("inf") for v in vals):
        raise SegAnyError(f"invalid box {text!r}: coordinates must be finite numbers")
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise SegAnyError(f"invalid box {text!r}: X1 must be > X0 and Y1 > Y0 (the box is empty)")
    return vals  # type: ignore[return-value]


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model name (see `segany models`) or checkpoint path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--compile`` for a command that loads a model (:func:`segany.perf.optimize`)."""
    from segany.perf import PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="image encoder precision: fp32 (default, the official outputs), bf16 or int8 (faster, approximate; "
        "int8 quantises linear layers, so not the default model's convolutional encoder)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (slow first image)")


def one_line_errors(p: argparse.ArgumentParser, command: str) -> None:
    """argparse errors (bad number, missing option, unknown choice) as one line and exit 2, like every
    other error."""

    def error(message: str) -> None:
        print(f"segany {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    p.error = error  # type: ignore[method-assign]


def add_generator_args(
    p: argparse.ArgumentParser, title: str, defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None
) -> None:
    """The automatic mask generator's options (:data:`segany.automatic.options.GENERATOR_OPTIONS`), with
    the official defaults unless ``defaults`` / ``helps`` give others."""
    from segany.automatic.options import GENERATOR_OPTIONS

    defaults, helps = defaults or {}, helps or {}
    g = p.add_argument_group(title)
    for o in GENERATOR_OPTIONS:
        g.add_argument(o.flag, type=o.type, default=defaults.get(o.name, o.default), metavar=o.metavar,
                       help=helps.get(o.name, o.help))


def generator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generator options of :func:`add_generator_args`, checked, as the generator's keyword arguments."""
    from segany.automatic.options import GENERATOR_OPTIONS, check_generator_options

    return check_generator_options({o.name: getattr(args, o.name) for o in GENERATOR_OPTIONS})
