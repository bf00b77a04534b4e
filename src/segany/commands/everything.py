"""``segany everything``: segment everything in images and folders, resumably
(:mod:`segany.automatic.everything` describes the outputs).

The exit status is 1 when some images failed, 2 when no image could be read at all (bad input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segany.commands.args import add_generator_args, add_model_arg, add_speed_args, generator_kwargs, one_line_errors


def add_args(p: argparse.ArgumentParser) -> None:
    from segany.automatic.everything import FORMATS

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--format", choices=FORMATS, default="sa1b", help="sa1b (default), coco or png")
    add_generator_args(p, "generator (the official SamAutomaticMaskGenerator options and defaults)")
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png (all masks over the image)")
    p.add_argument("--cutouts", action="store_true", help="also write NAME_cutouts/<i>.png (RGBA, one per mask)")
    add_model_arg(p)
    add_speed_args(p)
    one_line_errors(p, "everything")


def run(args: argparse.Namespace) -> int:
    from segany.automatic.everything import segment_everything

    res = segment_everything(
        args.inputs, Path(args.out), generator_kwargs(args), fmt=args.format, overlay=args.overlay,
        cutouts=args.cutouts, model=args.model, device=args.device, precision=args.precision, compile=args.compile,
    )
    print(
        f"everything: {res.images} images ({res.done} done, {res.skipped} skipped, {res.failed} failed), "
        f"{res.masks} masks, {res.seconds:.1f} s -> {res.where}"
    )
    if res.unreadable and res.unreadable == res.images:
        print(f"segany everything: error: none of the {res.images} images could be read", file=sys.stderr)
        return 2
    return 1 if res.failed else 0
