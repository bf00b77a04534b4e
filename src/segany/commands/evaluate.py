"""``segany eval``: measure a model on a labelled folder with the click, box or everything protocol."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segany.commands.args import add_model_arg
from segany.errors import SegAnyError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="label-map folder (images/ + masks/, e.g. ../shared/data/bsds500)")
    p.add_argument("--split", help="split name from DATA/splits/ (davis2016_val: davis_train | davis_val)")
    p.add_argument(
        "--protocol", choices=("clicks", "box", "everything"), default="clicks",
        help="clicks: simulated clicks per object (mIoU@k, NoC@85/90); box: one box per object (mIoU); "
        "everything: automatic masks (average recall) (default: clicks)",
    )
    p.add_argument("-o", "--out", help="folder for summary.json, per_image.json and plots")
    p.add_argument("--max-images", type=int, help="evaluate at most this many images")
    p.add_argument("--max-objects", type=int, help="at most this many objects per image")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks per object, clicks protocol (default: 20)")
    p.add_argument("--min-area", type=int, default=1, help="skip objects smaller than this, in pixels (default: 1)")
    p.add_argument(
        "--points-per-side", type=int, default=32,
        help="everything protocol: a grid of N x N point prompts (default: 32)",
    )
    p.add_argument(
        "--zoom-in", action="store_true",
        help="clicks and box protocols: answer on a crop around the object (the first click refined there, later "
        "ones predicted there, boxes where the crop enlarges them three times or more), as RITM's evaluation does "
        "(an image embedding whenever the crop moves)",
    )
    add_model_arg(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.checkpoint import load_model
    from segany.evaluation.protocols import load_samples, run_box, run_clicks, run_everything
    from segany.predictor import SamPredictor

    for name in ("max_images", "max_objects", "max_clicks", "min_area", "points_per_side"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "min_area" else 1):
            raise SegAnyError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.zoom_in and args.protocol == "everything":
        raise SegAnyError("--zoom-in applies to the clicks and box protocols, not everything")
    if not Path(args.data).is_dir():
        raise SegAnyError(f"{args.data}: no such folder")
    found = load_samples(args.data, args.split, args.max_images)
    model = load_model(args.model, device=args.device)
    # Progress on stderr (stdout carries the JSON summary).
    samples = tqdm(found, total=len(found), desc=f"eval {args.protocol}", unit="img", file=sys.stderr,
                   dynamic_ncols=True)
    if args.protocol in ("clicks", "box"):
        from segany.zoom_in import ZoomInPredictor

        predictor = ZoomInPredictor(SamPredictor(model)) if args.zoom_in else SamPredictor(model)
        common = dict(min_area=args.min_area, max_objects_per_image=args.max_objects)
        if args.protocol == "clicks":
            res = run_clicks(predictor, samples, max_clicks=args.max_clicks, **common)
        else:
            res = run_box(predictor, samples, **common)
    else:
        from segany.automatic import SamAutomaticMaskGenerator

        gen = SamAutomaticMaskGenerator(model, points_per_side=args.points_per_side)
        res = run_everything(gen.generate, samples, min_area=args.min_area, max_objects_per_image=args.max_objects)
    summary = res.summary()
    summary.update({"data": str(args.data), "split": args.split, "model": str(args.model), "protocol": args.protocol})
    if args.zoom_in:
        summary["zoom_in"] = True
    if args.out:
        res.write(args.out)
    print(json.dumps(summary, indent=2))
    return 0

