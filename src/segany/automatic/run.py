"""``segany everything``: segment everything in images, folders of images, resumably.

Outputs, per image (``NAME`` is the image path relative to the common folder of all inputs, without its
suffix, so ``a/x.jpg`` and ``b/x.jpg`` do not collide):

* ``--format sa1b`` (default): ``OUT_DIR/NAME.json``, SA-1B style (compressed RLE per mask).
* ``--format coco``: per-image results in ``OUT_DIR/.parts/NAME.json`` (SA-1B style), assembled at the end
  into one ``OUT_DIR/annotations.json``.
* ``--format png``: ``OUT_DIR/NAME.png``, a label map (0 background, masks 1, 2, ... skipping 255).
* ``--overlay``: ``OUT_DIR/NAME_overlay.png``; ``--cutouts``: ``OUT_DIR/NAME_cutouts/<i>.png`` (RGBA, ``i``
  the 1-based mask number, as the SA-1B annotation ids).

Every file is written atomically, and an image's main output (JSON, part or label map) is written last, so
it marks the image done: a rerun skips images whose main output exists and reads back (and whose
overlay / cut-outs exist when asked for), redoes the others, and removes temporary files that a killed run
left behind. One output folder serves one run at a time. Images that cannot be read are reported (one line
on stderr each) and skipped; the exit status is then 1, or 2 when no image could be read at all (bad input).
An image where the filters removed every candidate mask is reported on stderr with what each filter removed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from segany.errors import SegAnyError
from segany.io.atomic import remove_stray_temp_files

FORMATS = ("sa1b", "coco", "png")
PARTS = ".parts"
COCO_FILE = "annotations.json"


# -- options ---------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    from segany.cli import add_model_arg
    from segany.perf import add_speed_args

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--format", choices=FORMATS, default="sa1b", help="sa1b (default), coco or png")
    g = p.add_argument_group("generator (the official SamAutomaticMaskGenerator options and defaults)")
    g.add_argument("--points-per-side", type=int, default=32, metavar="N", help="grid of N x N prompts (32)")
    g.add_argument("--points-per-batch", type=int, default=64, metavar="N", help="prompts decoded at once (64)")
    g.add_argument("--pred-iou-thresh", type=float, default=0.88, metavar="F", help="keep predicted IoU > F (0.88)")
    g.add_argument("--stability-score-thresh", type=float, default=0.95, metavar="F", help="(0.95)")
    g.add_argument("--stability-score-offset", type=float, default=1.0, metavar="F", help="(1.0)")
    g.add_argument("--box-nms-thresh", type=float, default=0.7, metavar="F", help="NMS within a crop (0.7)")
    g.add_argument("--crop-n-layers", type=int, default=0, metavar="N", help="zoomed crop layers (0)")
    g.add_argument("--crop-nms-thresh", type=float, default=0.7, metavar="F", help="NMS across crops (0.7)")
    g.add_argument("--crop-overlap-ratio", type=float, default=512 / 1500, metavar="F", help="(0.341)")
    g.add_argument("--crop-n-points-downscale-factor", type=int, default=1, metavar="N", help="(1)")
    g.add_argument("--min-mask-region-area", type=int, default=0, metavar="N", help="remove holes/islands < N px")
    g.add_argument(
        "--max-mask-region-fraction", type=float, default=None, metavar="F",
        help="drop masks covering more than F of the image (SA-1B uses 0.95; default: keep)",
    )
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png (all masks over the image)")
    p.add_argument("--cutouts", action="store_true", help="also write NAME_cutouts/<i>.png (RGBA, one per mask)")
    add_model_arg(p)
    add_speed_args(p)
    p.error = _one_line_error  # type: ignore[method-assign]


def _one_line_error(message: str) -> None:
    """argparse errors (bad number, missing -o, unknown format) as one line, like every other error."""
    print(f"segany everything: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def generator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generator options, checked with messages that name the command-line option."""

    def need(ok: bool, opt: str, what: str, value: Any) -> None:
        if not ok:
            raise SegAnyError(f"--{opt} must be {what}, got {value}")

    for opt in ("points-per-side", "points-per-batch", "crop-n-points-downscale-factor"):
        v = getattr(args, opt.replace("-", "_"))
        need(v >= 1, opt, ">= 1", v)
    for opt in ("crop-n-layers", "min-mask-region-area"):
        v = getattr(args, opt.replace("-", "_"))
        need(v >= 0, opt, ">= 0", v)
    for opt in ("pred-iou-thresh", "stability-score-thresh", "box-nms-thresh", "crop-nms-thresh"):
        v = getattr(args, opt.replace("-", "_"))
        need(0.0 <= v <= 1.0, opt, "in [0, 1]", v)
    need(0.0 <= args.stability_score_offset < float("inf"), "stability-score-offset", "a number >= 0",
         args.stability_score_offset)
    need(0.0 <= args.crop_overlap_ratio < 1.0, "crop-overlap-ratio", "in [0, 1)", args.crop_overlap_ratio)
    f = args.max_mask_region_fraction
    need(f is None or 0.0 < f <= 1.0, "max-mask-region-fraction", "in (0, 1]", f)
    need(args.crop_n_layers <= 4, "crop-n-layers", "<= 4 (layer 4 already has 256 crops)", args.crop_n_layers)
    kept = args.points_per_side // args.crop_n_points_downscale_factor**args.crop_n_layers
    need(kept >= 1, "points-per-side", f">= {args.crop_n_points_downscale_factor ** args.crop_n_layers} with "
         f"these crop options (no points would be left in the last crop layer)", args.points_per_side)
    return {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "stability_score_offset": args.stability_score_offset,
        "box_nms_thresh": args.box_nms_thresh,
        "crop_n_layers": args.crop_n_layers,
        "crop_nms_thresh": args.crop_nms_thresh,
        "crop_overlap_ratio": args.crop_overlap_ratio,
        "crop_n_points_downscale_factor": args.crop_n_points_downscale_factor,
        "min_mask_region_area": args.min_mask_region_area,
        "max_mask_region_fraction": args.max_mask_region_fraction,
        "output_mode": "coco_rle",
    }


# -- inputs and output names -----------------------------------------------------------------------


def collect_images(inputs: list[str], out_dir: Path) -> list[Path]:
    """Image paths (resolved, unique, sorted as listed), leaving out anything inside ``out_dir``."""
    from segany.io.images import list_images

    out = out_dir.resolve()
    seen: set[Path] = set()
    found: list[Path] = []
    for p in list_images(inputs):
        r = p.resolve()
        if r in seen or r == out or out in r.parents:
            continue
        seen.add(r)
        found.append(r)
    if not found:
        raise SegAnyError("no images to process (the inputs hold no images outside the output folder)")
    return found


def output_names(images: list[Path]) -> list[str]:
    """One output name per image: the path relative to the common folder of all images, as POSIX text,
    without the suffix (kept where two images would otherwise share a name, e.g. ``x.jpg`` / ``x.png``)."""
    root = Path(os.path.commonpath([str(p.parent) for p in images]))
    rel = [p.relative_to(root) for p in images]
    bare = [r.with_suffix("").as_posix() for r in rel]
    counts: dict[str, int] = {}
    for b in bare:
        counts[b.casefold()] = counts.get(b.casefold(), 0) + 1
    return [b if counts[b.casefold()] == 1 else r.as_posix() for b, r in zip(bare, rel)]


class Outputs:
    """Where each output of one image goes, and whether the image is already done."""

    def __init__(self, out_dir: Path, fmt: str, overlay: bool, cutouts: bool) -> None:
        self.out_dir, self.fmt, self.overlay, self.cutouts = out_dir, fmt, overlay, cutouts

    def main(self, name: str) -> Path:
        if self.fmt == "coco":
            return self.out_dir / PARTS / f"{name}.json"
        return self.out_dir / f"{name}.{'png' if self.fmt == 'png' else 'json'}"

    def overlay_path(self, name: str) -> Path:
        return self.out_dir / f"{name}_overlay.png"

    def cutout_dir(self, name: str) -> Path:
        return self.out_dir / f"{name}_cutouts"

    def done(self, name: str) -> bool:
        """The main output reads back (and the asked-for extras exist)."""
        from segany.io.labelmaps import read_label_map
        from segany.io.sa1b import read_sa1b

        path = self.main(name)
        if not path.is_file():
            return False
        try:
            if self.fmt == "png":
                n_masks = int(np.count_nonzero(np.unique(read_label_map(path))))
            else:
                n_masks = len(read_sa1b(path)[1])
        except SegAnyError:
            return False
        if self.overlay and not self.overlay_path(name).is_file():
            return False
        if self.cutouts:
            d = self.cutout_dir(name)
            # A label map loses masks hidden under others, so only the count of visible ones is known.
            have = sum(1 for q in d.glob("*.png") if q.stem.isdigit()) if d.is_dir() else 0
            if have < n_masks:
                return False
        return True


# -- one image -------------------------------------------------------------------------------------


def write_image_outputs(
    outputs: Outputs, name: str, image: np.ndarray, image_id: int, file_name: str, records: list[dict]
) -> None:
    """Extras first, the main output last (it marks the image done)."""
    from pycocotools import mask as mask_utils

    from segany.io.png import write_label_map
    from segany.io.sa1b import write_sa1b
    from segany.viz import cutout, overlay_masks, save_png

    h, w = image.shape[:2]
    masks: list[np.ndarray] | None = None
    if outputs.overlay or outputs.cutouts or outputs.fmt == "png":
        rles = [{"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()} for r in records]
        masks = [m.astype(bool) for m in np.moveaxis(mask_utils.decode(rles), -1, 0)] if rles else []
    if outputs.overlay:
        save_png(outputs.overlay_path(name), overlay_masks(image, masks))
    if outputs.cutouts:
        d = outputs.cutout_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        written = set()
        for i, m in enumerate(masks, start=1):
            if m.any():
                save_png(d / f"{i}.png", cutout(image, m))
                written.add(f"{i}.png")
        for q in d.glob("*.png"):  # left over from an earlier run with more masks
            if q.stem.isdigit() and q.name not in written:
                q.unlink(missing_ok=True)
    info = {"image_id": image_id, "width": w, "height": h, "file_name": file_name}
    if outputs.fmt == "png":
        write_label_map(outputs.main(name), masks, shape=(h, w))
    else:
        write_sa1b(outputs.main(name), info, records)


def assemble_coco(outputs: Outputs, names: list[str], file_names: list[str], ok: list[bool]) -> int:
    """``OUT_DIR/annotations.json`` from the parts of this run's images that are done (image ids 1, 2, ...
    in input order, whatever the parts say: they may come from runs over other inputs); returns the count."""
    from segany.io.coco import CocoWriter
    from segany.io.sa1b import read_sa1b

    writer = CocoWriter()
    n = 0
    for name, file_name, good in zip(names, file_names, ok):
        if good:
            info, anns = read_sa1b(outputs.main(name))
            n += 1
            writer.add({**info, "image_id": n, "file_name": file_name}, anns)
    writer.write(outputs.out_dir / COCO_FILE)
    return n


# -- the command -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.automatic.generator import SamAutomaticMaskGenerator, describe_filter_counts
    from segany.checkpoint import load_model
    from segany.io.images import load_image
    from segany.perf import apply_speed_args

    t0 = time.perf_counter()
    kwargs = generator_kwargs(args)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SegAnyError(f"{out_dir}: exists and is not a folder")
    images = collect_images(args.inputs, out_dir)
    names = output_names(images)
    root = Path(os.path.commonpath([str(p.parent) for p in images]))
    file_names = [p.relative_to(root).as_posix() for p in images]
    outputs = Outputs(out_dir, args.format, args.overlay, args.cutouts)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stray_temp_files(out_dir)

    done_before = [outputs.done(n) for n in names]
    # The model is loaded once, and only when there is work; a model that cannot be loaded ends the run.
    generator = None
    if not all(done_before):
        model = apply_speed_args(load_model(args.model, device=args.device), args)
        generator = SamAutomaticMaskGenerator(model, **kwargs)
    n_done = n_failed = n_unreadable = n_masks = 0
    ok = list(done_before)

    def failed(msg: str) -> None:
        nonlocal n_failed
        n_failed += 1
        tqdm.write(f"segany everything: skipped {msg}", file=sys.stderr)

    bar = tqdm(total=len(images), desc="everything", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        for i, (path, name) in enumerate(zip(images, names)):
            if done_before[i]:
                bar.update(1)
                continue
            try:
                image = load_image(path)
            except SegAnyError as e:  # unreadable, corrupt, too large: this image only
                n_unreadable += 1
                failed(str(e))
                bar.update(1)
                continue
            try:
                records = generator.generate(image)
            except (SegAnyError, RuntimeError, MemoryError) as e:  # e.g. out of memory on a huge image
                failed(f"{path}: {type(e).__name__}: {e}")
                bar.update(1)
                continue
            try:
                write_image_outputs(outputs, name, image, i + 1, file_names[i], records)
            except OSError as e:  # disk full, permissions: every later image would fail the same way
                raise SegAnyError(f"cannot write the outputs of {path} in {out_dir}: {e}") from None
            ok[i] = True
            n_done += 1
            n_masks += len(records)
            if not records:
                tqdm.write(
                    f"segany everything: {path}: no masks: {describe_filter_counts(generator.filter_counts)} "
                    f"(lower --pred-iou-thresh {args.pred_iou_thresh} / --stability-score-thresh "
                    f"{args.stability_score_thresh} to keep more)",
                    file=sys.stderr,
                )
            bar.update(1)
    finally:
        bar.close()
    n_skipped = sum(done_before)
    if args.format == "coco":
        assemble_coco(outputs, names, file_names, ok)
    seconds = time.perf_counter() - t0
    where = out_dir / COCO_FILE if args.format == "coco" else out_dir
    print(
        f"everything: {len(images)} images ({n_done} done, {n_skipped} skipped, {n_failed} failed), "
        f"{n_masks} masks, {seconds:.1f} s -> {where}"
    )
    if n_unreadable and n_unreadable == len(images):
        print(f"segany everything: error: none of the {len(images)} images could be read", file=sys.stderr)
        return 2
    return 1 if n_failed else 0


def _register() -> None:
    from segany.cli import register

    register("everything", "segment everything in images / folders (SA-1B, COCO or PNG; resumable)", add_args, run)


_register()
