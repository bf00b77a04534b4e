"""Segment everything in images and folders of images, resumably (``segany everything``).

Outputs, per image (``NAME`` is the image path relative to the common folder of all inputs, without its
suffix, so ``a/x.jpg`` and ``b/x.jpg`` do not collide):

* ``sa1b`` (default): ``OUT_DIR/NAME.json``, SA-1B style (compressed RLE per mask).
* ``coco``: per-image results in ``OUT_DIR/.parts/NAME.json`` (SA-1B style), assembled at the end into one
  ``OUT_DIR/annotations.json``.
* ``png``: ``OUT_DIR/NAME.png``, a label map (0 background, masks 1, 2, ... skipping 255).
* ``overlay``: ``OUT_DIR/NAME_overlay.png``; ``cutouts``: ``OUT_DIR/NAME_cutouts/<i>.png`` (RGBA, ``i`` the
  1-based mask number, as the SA-1B annotation ids).

Every file is written atomically, and an image's main output (JSON, part or label map) is written last, so
it marks the image done: a rerun skips images whose main output exists and reads back (and whose
overlay / cut-outs exist when asked for), redoes the others, and removes temporary files that a killed run
left behind. One output folder serves one run at a time. Images that cannot be read are reported (one line
on stderr each) and skipped. An image where the filters removed every candidate mask is reported on
stderr with what each filter removed. The loop itself is :mod:`segany.automatic.folder`'s.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segany.automatic.folder import Generated, collect_images, generate_images, output_names, relative_files
from segany.automatic.folder import write_results as _write_results
from segany.errors import SegAnyError
from segany.io.atomic import remove_stray_temp_files

FORMATS = ("sa1b", "coco", "png")
PARTS = ".parts"
COCO_FILE = "annotations.json"


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


@dataclass
class EverythingResult:
    """What one :func:`segment_everything` call did."""

    images: int
    done: int = 0  #: segmented by this call
    skipped: int = 0  #: done before
    failed: int = 0
    unreadable: int = 0  #: of the failed, those that could not be read at all
    masks: int = 0  #: masks written by this call
    seconds: float = 0.0
    where: Path | None = None  #: the output folder, or the COCO file


def segment_everything(
    inputs: list[str],
    out_dir: Path,
    generator_kwargs: dict[str, Any],
    fmt: str = "sa1b",
    overlay: bool = False,
    cutouts: bool = False,
    model: str = "default",
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    progress: bool = True,
) -> EverythingResult:
    """Segment every image of ``inputs`` (files and folders) into ``out_dir`` (see the module docstring).

    Args:
        generator_kwargs: :class:`SamAutomaticMaskGenerator` keyword arguments, ``output_mode="coco_rle"``
            (e.g. from :func:`segany.automatic.options.check_generator_options`).
        precision, compile: the image encoder's speed mode (:func:`segany.perf.optimize`).
    """
    from tqdm import tqdm

    from segany.automatic.generator import SamAutomaticMaskGenerator, describe_filter_counts
    from segany.checkpoint import load_model
    from segany.perf import optimize

    if fmt not in FORMATS:
        raise SegAnyError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SegAnyError(f"{out_dir}: exists and is not a folder")
    images = collect_images(inputs, out_dir)
    names = output_names(images)
    file_names = relative_files(images)
    outputs = Outputs(out_dir, fmt, overlay, cutouts)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stray_temp_files(out_dir)

    ok = [outputs.done(n) for n in names]
    todo = [i for i, good in enumerate(ok) if not good]
    res = EverythingResult(len(images), skipped=len(images) - len(todo))
    if todo:  # the model is loaded once, and only when there is work; one that cannot be loaded ends the run
        generator = SamAutomaticMaskGenerator(optimize(load_model(model, device=device), precision, compile),
                                              **generator_kwargs)

        def write(i: int, gen: Generated) -> None:
            records = gen.records
            write_image_outputs(outputs, names[i], gen.image, i + 1, file_names[i], records)
            ok[i] = True
            res.masks += len(records)
            if not records:
                tqdm.write(
                    f"segany everything: {images[i]}: no masks: {describe_filter_counts(generator.filter_counts)} "
                    f"(lower --pred-iou-thresh {generator.pred_iou_thresh} / --stability-score-thresh "
                    f"{generator_kwargs['stability_score_thresh']} to keep more)",
                    file=sys.stderr,
                )

        counts = _write_results(
            generate_images([images[i] for i in todo], generator, keep_images=True), todo, write,
            lambda i: f"the outputs of {images[i]} in {out_dir}", "everything", len(images), progress,
        )
        res.done, res.failed, res.unreadable = counts.done, counts.failed, counts.unreadable
    if fmt == "coco":
        assemble_coco(outputs, names, file_names, ok)
    res.where = out_dir / COCO_FILE if fmt == "coco" else out_dir
    res.seconds = time.perf_counter() - t0
    return res
