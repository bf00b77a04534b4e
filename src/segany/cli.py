"""The ``segany`` command.

Every sub-command reports user errors as one line on stderr and exits 2 (no traceback); set
``SEGANY_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from segany.commands import engine, evaluate, everything, export_onnx, segment, serve, train
from segany.commands.args import add_model_arg, parse_box, parse_xy  # noqa: F401  (their home before)
from segany.errors import SegAnyError


@dataclass(frozen=True)
class Command:
    """One sub-command: ``add_args(parser)`` declares its options, ``run(args)`` returns the exit code."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Every sub-command, in the order ``segany --help`` lists them. The command modules import nothing heavy
#: at the top (``segany --help`` works without fastapi, onnx or matplotlib installed).
COMMANDS: dict[str, Command] = {
    "segment": Command("segment an image from point / box / text prompts", segment.add_args, segment.run),
    "models": Command("list the known model names and the files they need", segment.add_models_args,
                      segment.run_models),
    "convert": Command("convert a checkpoint to segany's .safetensors format", segment.add_convert_args,
                       segment.run_convert),
    "everything": Command("segment everything in images / folders (SA-1B, COCO or PNG; resumable)",
                          everything.add_args, everything.run),
    "annotate": Command(
        "annotate images into a training dataset (SA-1B files + manifest; stage 3, or 2 with --semi)",
        engine.add_annotate_args, engine.run_annotate,
    ),
    "dataset-stats": Command("masks per image and mask sizes of a dataset, as the SA-1B paper's figures",
                             engine.add_stats_args, engine.run_stats),
    "engine": Command("the data engine loop: annotate -> train -> evaluate, for N rounds", engine.add_engine_args,
                      engine.run_engine),
    "eval": Command("evaluate a model on a labelled folder (clicks | box | everything)", evaluate.add_args,
                    evaluate.run),
    "serve": Command("the interactive web tool and its HTTP API", serve.add_args, serve.run),
    "export-onnx": Command("export the prompt decoder (and the image encoder) to ONNX", export_onnx.add_args,
                           export_onnx.run),
    "train": Command("train or fine-tune a model (the paper's simulated interactive training)", train.add_args,
                     train.run),
    "train-text": Command("train a text head (text prompts) on a frozen model", train.add_text_args,
                          train.run_text),
    "train-refiner": Command("train a model's point refiner (its masks' edges at full resolution), the model frozen",
                             train.add_refiner_args, train.run_refiner),
    "train-correction": Command("train a model's correction decoder (the clicks after the first) on its own clicks",
                                train.add_correction_args, train.run_correction),
}


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany", description="Segment Anything, offline.")
    parser.add_argument("--version", action="version", version="segany 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_args(sub.add_parser(name, help=command.help, description=command.help))
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
    from segany.perf import reuse_freed_memory, use_huge_pages

    use_huge_pages()  # before the command makes its first tensor
    reuse_freed_memory()
    try:
        return int(COMMANDS[args.command].run(args) or 0)
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
    sys.exit(main())
