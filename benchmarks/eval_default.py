"""Quality of a model on the held-out real images named by the default-model issue.

    python benchmarks/eval_default.py [--model default] [--max-objects 10] [--out runs/eval_default] [--zoom-in]

Held-out sets: the last 5 davis2016_val sequences, coco_panoptic200 val2017, coco_instances_mini val
(clicks: mIoU@1, @5, NoC@85/90; box: mIoU) and bsds500 test (clicks). Prints a Markdown table (pasted
into MODELS.md) and writes each protocol's summary and per-image JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

from segany import SamPredictor, load_model
from segany.evaluation.protocols import _select_objects, load_samples, run_box, run_clicks
from segany.zoom_in import ZoomInPredictor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = [
    ("DAVIS (last 5 seq.)", "davis2016_val", "davis_val", True),
    ("COCO panoptic val2017", "coco_panoptic200", "val2017", True),
    ("COCO instances val", "coco_instances_mini", "val", True),
    ("BSDS500 test", "bsds500", "test", False),
]
SPLITS = {folder: split for _, folder, split, _ in SETS}


def held_out_objects(
    folder: str, max_images: int | None = None, min_area: int = 100, max_objects: int | None = 10
) -> Iterator[tuple]:
    """``(sample, [(index, gt, ignore, area)], group)`` for each image of a held-out set that has objects, chosen
    as the click protocol chooses them; ``group`` is the video sequence where the set has them, else None."""
    sequences = (DATA / folder / "sequences.txt").is_file()
    for sample in load_samples(DATA / folder, SPLITS[folder], max_images):
        objects, _ = _select_objects(sample, min_area, max_objects)
        if objects:
            yield sample, objects, re.sub(r"_\d+$", "", sample.stem) if sequences else None


def evaluate_set(
    predictor,
    root: Path,
    split: str | None,
    with_box: bool,
    max_clicks: int,
    max_images: int | None,
    max_objects: int | None,
    min_area: int,
    out: Path | None = None,
) -> dict:
    """The click protocol (and the box protocol when ``with_box``) on one folder: a row of the table
    (objects, mIoU@1/@3/@5, NoC@85/90, box mIoU); with ``out``, each protocol's JSON is written there."""
    common = dict(min_area=min_area, max_objects_per_image=max_objects)
    clicks = run_clicks(predictor, load_samples(root, split, max_images), max_clicks=max_clicks, **common)
    s = clicks.summary()
    row = {"objects": s["num_objects"], "mIoU@1": s["mIoU@1"], "mIoU@3": s.get("mIoU@3"), "mIoU@5": s.get("mIoU@5")}
    row.update({"NoC@85": s["NoC@85"], "NoC@90": s["NoC@90"]})
    if out is not None:
        clicks.write(out / "clicks")
    if with_box:
        box = run_box(predictor, load_samples(root, split, max_images), **common)
        row["box mIoU"] = box.summary()["mIoU"]
        if out is not None:
            box.write(out / "box")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-objects", type=int, default=10, help="objects per image (the first ones, in mask order)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--min-area", type=int, default=100, help="skip objects smaller than this (pixels)")
    ap.add_argument("--max-clicks", type=int, default=5)
    ap.add_argument("--out", default="runs/eval_default")
    ap.add_argument("--sets", nargs="+", help="only these folders (e.g. davis2016_val coco_instances_mini)")
    ap.add_argument("--zoom-in", action="store_true", help="clicks, boxes on a crop around the object (RITM)")
    args = ap.parse_args()
    predictor = SamPredictor(load_model(args.model))
    if args.zoom_in:
        predictor = ZoomInPredictor(predictor)
    rows = []
    for title, folder, split, with_box in SETS:
        if args.sets and folder not in args.sets:
            continue
        if not (DATA / folder).is_dir():
            print(f"skipping {title}: {DATA / folder} not found")
            continue
        out = Path(args.out) / folder
        row = evaluate_set(predictor, DATA / folder, split, with_box, args.max_clicks, args.max_images,
                           args.max_objects, args.min_area, out)
        row = {"set": title, **row}
        rows.append(row)
        print(json.dumps(row))
    cols = ["set", "objects", "mIoU@1", "mIoU@3", "mIoU@5", "NoC@85", "NoC@90", "box mIoU"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print(
            "| "
            + " | ".join(f"{c:.3f}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
