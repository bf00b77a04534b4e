"""``segany segment`` (one image, prompts -> masks), ``segany models`` and ``segany convert``."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from segany.commands.args import add_model_arg, parse_box, parse_xy
from segany.errors import SegAnyError


def add_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--zoom-in", action="store_true",
        help="answer points and a box on a crop around the object (RITM's zoom-in: finer masks, one more "
        "image embedding; a click's best mask refined on a crop, unless --multimask; a box where its crop "
        "enlarges it three times or more)",
    )
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    add_model_arg(p)


def run(args: argparse.Namespace) -> int:
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
        text=args.text, instances=args.instances, detector=args.detector, zoom_in=args.zoom_in,
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


def add_models_args(p: argparse.ArgumentParser) -> None:
    """``segany models`` takes no options."""


def run_models(args: argparse.Namespace) -> int:
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


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        nargs="+",
        help="checkpoint to read (.pth, .pt, .safetensors, or a Hugging Face SamModel folder); several of one "
        "architecture: their weights' mean is written",
    )
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--half", action="store_true", help="store fp16 (half the size)")
    p.add_argument(
        "--image-size", type=int, metavar="N",
        help="run the model at this input size (longest side, pixels; EfficientNet-Lite models only)",
    )
    p.add_argument(
        "--max-image-size", type=int, metavar="N",
        help="encode a larger image at its own longest side (rounded up to 32) up to N pixels rather than "
        "shrink it to the input size; 0: always the input size (EfficientNet-Lite models only)",
    )
    p.add_argument(
        "--correction-decoder", metavar="CKPT",
        help="answer prompts with a mask input (every click after the first) with CKPT's mask decoder, a run of "
        "the same segany model (MODELS.md: correction decoders); the other answers stay the source's",
    )
    p.add_argument(
        "--correction-skip", choices=["all", "prompts"], default="all",
        help="with --correction-decoder: what its skip at the mask grid reads, all four maps or the clicks and "
        "the box only (the previous mask's weights zeroed; the default model's)",
    )
    p.add_argument(
        "--crop-refiner", metavar="CKPT",
        help="refine zoom-in's crops, and the images the input enlarges more than the point refiner's limit, with "
        "CKPT's point refiner (one trained on zoom-in's crops: configs/point_refiner_zoom.yaml)",
    )
    p.add_argument(
        "--decode-padding", action=argparse.BooleanOptionalAction, default=None,
        help="whether the mask decoder also decodes the input's padding, as SAM does (--no-decode-padding: only "
        "what the post-processing reads, faster; segany models with high-resolution features; default: keep)",
    )
    p.add_argument(
        "--first-prompt-threshold", type=float, metavar="F",
        help="cut the refined answers to first prompts (clicks and boxes without a mask input, zoom-in's first "
        "click, \"everything\") at logit F rather than SAM's 0 (the default model's: -0.5, MODELS.md); default: keep",
    )
    p.add_argument(
        "--correction-refiner-budget", type=int, metavar="N",
        help="the point refiner corrects N uncertain pixels of each answer to a prompt with a mask input (the "
        "clicks after the first; 0: all of them; first prompts keep 2,048; the default model's: 8,192, "
        "MODELS.md); default: keep",
    )


def _settings(args: argparse.Namespace) -> dict:
    """The config settings that keep every weight, as ``segany convert``'s options change them."""
    settings = {
        "decode_padding": args.decode_padding,
        "first_prompt_threshold": args.first_prompt_threshold,
        "correction_refiner_budget": args.correction_refiner_budget,
    }
    threshold = args.first_prompt_threshold
    if threshold is not None and not math.isfinite(threshold):
        raise SegAnyError(f"--first-prompt-threshold must be a finite number, got {threshold}")
    if args.correction_refiner_budget is not None and args.correction_refiner_budget < 0:
        raise SegAnyError(f"--correction-refiner-budget must be 0 (all) or more, got {args.correction_refiner_budget}")
    return {k: v for k, v in settings.items() if v is not None}


def run_convert(args: argparse.Namespace) -> int:
    from segany.checkpoint_convert import convert_checkpoint

    if not str(args.dst).endswith(".safetensors"):
        raise SegAnyError(f"{args.dst}: the output must end in .safetensors")
    src = args.src[0] if len(args.src) == 1 else args.src
    cap = "keep" if args.max_image_size is None else (args.max_image_size or None)
    cfg = convert_checkpoint(src, args.dst, half=args.half, image_size=args.image_size, max_image_size=cap,
                             correction_decoder=args.correction_decoder,
                             correction_skip_mask=args.correction_skip == "all", crop_refiner=args.crop_refiner,
                             settings=_settings(args))
    size = os.path.getsize(args.dst) / 1e6
    what = args.src[0] if len(args.src) == 1 else "mean of " + ", ".join(args.src)
    larger = f", larger images up to {cfg.max_image_size}" if getattr(cfg, "max_image_size", None) else ""
    correction = f", correction decoder from {args.correction_decoder}" if args.correction_decoder else ""
    correction += f", crop refiner from {args.crop_refiner}" if args.crop_refiner else ""
    correction += ", the input's padding not decoded" if not getattr(cfg, "decode_padding", True) else ""
    first = getattr(cfg, "first_prompt_threshold", 0.0)
    correction += f", first prompts cut at logit {first:g}" if first else ""
    if getattr(cfg, "point_refiner", False):
        again = ", then by the second refiner" if getattr(cfg, "second_refiner", False) else ""
        correction += f", corrections refined on {cfg.correction_refiner_budget or 'all uncertain'} pixels{again}"
    print(f"{what} -> {args.dst} ({cfg.encoder.kind}, image size {cfg.image_size}{larger}{correction}, {size:.1f} MB)")
    return 0
