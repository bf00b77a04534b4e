"""Where a model's masks are wrong after N clicks: along the object's boundary, or away from it.

    python benchmarks/boundary_errors.py [--model default] [--sets davis2016_val] [--clicks 5] [--band-cells 1]

Runs the standard click protocol (``segany.evaluation.protocols.click_object``) on the held-out objects as
``benchmarks/eval_default.py`` chooses them, and splits the wrong pixels of the N-click mask into those
within ``--band-cells`` cells of the decoder's low-res mask grid of the true boundary (one cell: 4 input
pixels, about 7 pixels of an 854-px DAVIS frame at 512 px) and the rest. Also prints the IoU the masks
would have with that band corrected: how much of the gap is the boundary's (a finer mask, high-resolution
features) and how much the object's (a missed part, a leak). Per video sequence where the set has them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import cv2
import numpy as np
import torch
from eval_default import DATA, SPLITS, held_out_objects

from segany import SamPredictor, load_model
from segany.evaluation.metrics import mask_iou
from segany.evaluation.protocols import click_object


class LastMask:
    """A predictor that remembers the mask the click loop keeps (the best-scored one when multimask)."""

    def __init__(self, predictor: SamPredictor) -> None:
        self.predictor, self.mask = predictor, None

    def predict(self, **kwargs):
        masks, scores, low_res = self.predictor.predict(**kwargs)
        self.mask = masks[int(np.argmax(scores)) if kwargs.get("multimask_output") else 0]
        return masks, scores, low_res


def boundary_band(gt: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels of ``gt``'s boundary (both sides)."""
    m = gt.astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return cv2.dilate(m, k) != cv2.erode(m, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sets", nargs="+", default=["davis2016_val"], choices=list(SPLITS))
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--band-cells", type=float, default=1.0)
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--max-objects", type=int, default=10)
    ap.add_argument("--min-area", type=int, default=100)
    args = ap.parse_args()
    model = load_model(args.model, text_head=None)
    grid = model.prompt_encoder.mask_input_size[0]
    predictor = LastMask(SamPredictor(model))
    for folder in args.sets:
        if not (DATA / folder).is_dir():
            print(f"skipping {folder}: {DATA / folder} not found")
            continue
        rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for sample, objects, group in held_out_objects(folder, args.max_images, args.min_area, args.max_objects):
            predictor.predictor.set_image(sample.image)
            width = max(1, round(args.band_cells * max(sample.image.shape[:2]) / grid))
            for _, gt, ignore, _ in objects:
                ious, _ = click_object(predictor, gt, ignore, args.clicks)
                pred, band = predictor.mask, boundary_band(gt, width)
                wrong = (pred ^ gt) & ~(np.zeros_like(gt) if ignore is None else ignore)
                fixed = np.where(band, gt, pred)
                for key in ("all", group):
                    if key is not None:
                        rows[key]["iou"].append(ious[-1])
                        rows[key]["fixed"].append(mask_iou(fixed, gt, ignore))
                        rows[key]["near"].append(int((wrong & band).sum()))
                        rows[key]["wrong"].append(int(wrong.sum()))
        for key, r in rows.items():
            near = sum(r["near"]) / max(1, sum(r["wrong"]))
            print(
                json.dumps(
                    {
                        "set": folder,
                        "group": key,
                        "objects": len(r["iou"]),
                        f"mIoU@{args.clicks}": round(float(np.mean(r["iou"])), 3),
                        "wrong pixels near the boundary": round(near, 3),
                        "mIoU with the band corrected": round(float(np.mean(r["fixed"])), 3),
                    }
                )
            )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
