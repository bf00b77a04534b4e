"""The ``segany`` command.

Every sub-command reports user errors as one line on stderr and exits 2 (no traceback); set
``SEGANY_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from segany.errors import SegAnyError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def register(
    name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]
) -> None:
    """Add a sub-command: ``add_args(parser)`` declares its options, ``run(args)`` returns the exit code."""
    COMMANDS[name] = (add_args, run, help)


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


# -- segment ---------------------------------------------------------------------------------------


def _segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file")
    p.add_argument("--point", action="append", default=[], metavar="X,Y", help="positive point (repeatable)")
    p.add_argument("--negative", action="append", default=[], metavar="X,Y", help="negative point (repeatable)")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box prompt in pixels")
    p.add_argument("--multimask", action="store_true", help="write the 3 candidate masks, best first")
    p.add_argument("--text", help='text prompt, e.g. "the cat" (needs a model with a text head, or --detector)')
    p.add_argument(
        "--instances", type=int, metavar="N",
        help="with --text: one mask per matching object, at most N, best first (default: one mask for all of them)",
    )
    p.add_argument("--detector", metavar="DIR", help="with --text: an OWLv2 / Grounding DINO folder on disk")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    add_model_arg(p)


def _segment_run(args: argparse.Namespace) -> int:
    from segany.segment import segment_image

    points = [(parse_xy(t), 1) for t in args.point] + [(parse_xy(t, "negative point"), 0) for t in args.negative]
    box = parse_box(args.box) if args.box else None
    if args.text is None and (args.instances is not None or args.detector is not None):
        raise SegAnyError("--instances and --detector go with --text")
    if not points and box is None and args.text is None:
        raise SegAnyError('give at least one prompt: --point X,Y, --negative X,Y, --box X0,Y0,X1,Y1 or --text "..."')
    if args.instances is not None and (args.instances < 1 or points or box is not None):
        raise SegAnyError("--instances takes a positive number and a text alone (no points or box)")
    t0 = time.perf_counter()
    result = segment_image(
        Path(args.image), points, box, Path(args.out), model=args.model, device=args.device, multimask=args.multimask,
        text=args.text, instances=args.instances, detector=args.detector,
    )
    took = f"-> {args.out} ({time.perf_counter() - t0:.2f} s)"
    if not result["masks"]:
        print(f"{args.image}: no mask matches the text {args.text!r} {took}")
        return 0
    best = result["masks"][0]
    empty = [m["file"] for m in result["masks"] if m["empty"]]
    print(
        f"{args.image}: {len(result['masks'])} mask(s)"
        + (f" ({len(empty)} empty: {', '.join(empty)})" if empty else "")
        + f", best score {best['predicted_iou']:.3f}, area {best['area']} px {took}"
    )
    return 0


# -- models / convert ----------------------------------------------------------------------------


def _models_run(args: argparse.Namespace) -> int:
    from segany.checkpoint import KNOWN_MODELS, model_search_dirs, resolve_model_path

    nw = max(len(n) for n in KNOWN_MODELS)
    fw = max(len(f[0]) for f, _ in KNOWN_MODELS.values())
    print(f"{'name':<{nw}} {'file':<{fw}} {'status':<10} description")
    for name, (files, desc) in KNOWN_MODELS.items():
        try:
            status = f"found: {resolve_model_path(name)}"
        except SegAnyError:
            status = "missing"
        print(f"{name:<{nw}} {files[0]:<{fw}} {status:<10} {desc}")
    print("also: any other official SAM 2 / 2.1 .pt, SAM-HQ .pth, or a Hugging Face SamModel folder, by path")
    print("searched: " + ", ".join(str(d) for d in model_search_dirs()))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read (.pth, .pt, .safetensors, or a Hugging Face SamModel folder)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--half", action="store_true", help="store fp16 (half the size)")


def _convert_run(args: argparse.Namespace) -> int:
    from segany.checkpoint import convert_checkpoint

    if not str(args.dst).endswith(".safetensors"):
        raise SegAnyError(f"{args.dst}: the output must end in .safetensors")
    cfg = convert_checkpoint(args.src, args.dst, half=args.half)
    size = os.path.getsize(args.dst) / 1e6
    print(f"{args.src} -> {args.dst} ({cfg.encoder.kind}, image size {cfg.image_size}, {size:.1f} MB)")
    return 0


register("segment", "segment an image from point / box / text prompts", _segment_args, _segment_run)
register("models", "list the known model names and the files they need", lambda p: None, _models_run)
register("convert", "convert a checkpoint to segany's .safetensors format", _convert_args, _convert_run)


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Sub-commands defined in other modules register themselves on import.
    from segany import commands  # noqa: F401

    parser = argparse.ArgumentParser(prog="segany", description="Segment Anything, offline.")
    parser.add_argument("--version", action="version", version="segany 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _run, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


#: Options whose value may start with "-" (a negative coordinate).
_COORD_FLAGS = ("--point", "--negative", "--box")


def _glue_negative_values(argv: Sequence[str]) -> list[str]:
    """``--point -1,5`` -> ``--point=-1,5``: argparse would take "-1,5" for an option and answer with a
    usage screen; glued, the value is checked (and refused) like any other, in one line."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _COORD_FLAGS and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:2] in "0123456789.":
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_glue_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if not args.command:
        parser.print_help()
        return 2
    _add, run, _help = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except SegAnyError as e:
        print(f"segany {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segany {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"segany {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no (missing folder, permissions, disk full): not a bug
        where = f": {e.filename}" if e.filename else ""
        print(f"segany {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: no tracebacks for users
        if os.environ.get("SEGANY_DEBUG"):
            raise
        print(
            f"segany {args.command}: internal error: {type(e).__name__}: {e} (set SEGANY_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    # `python -m segany.cli` runs this file as __main__, a second copy of the module: the other
    # modules register their commands with `segany.cli`, so dispatch through that one.
    from segany.cli import main as _main

    sys.exit(_main())
