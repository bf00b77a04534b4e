"""A model against OpenCV's GrabCut driven by the same simulated clicks and boxes (issue 17's floor).

GrabCut learns nothing: it fits colour models to the image from the prompts alone, so a trained model
that does not beat it is not yet worth its weights. Both go through the same protocols
(:func:`segany.evaluation.protocols.run_clicks` / ``run_box``) on the same objects.

GrabCut's use of a prompt:
* clicks: a disk of radius ``CLICK_RADIUS`` around each click is definitely object (positive) or
  background (negative); after the first click the previous mask is "probably object" and the rest
  "probably background", except that a disk of ``CLICK_REACH`` of the shorter image side around each click
  is "probably" the click's side (so a correction moves more than its own few pixels; without it GrabCut's
  later clicks gained nothing: MODELS.md); on the first click a disk of ``FIRST_CLICK_REACH`` of the shorter
  image side around it is "probably object" (GrabCut needs both classes to start);
* box: the box is the rectangle initialisation.

    python benchmarks/grabcut_baseline.py --model default --clicks 5 \
        --data ../shared/data/davis2016_val:davis_val ../shared/data/coco_instances_mini:val
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from eval_default import evaluate_set  # same protocols and object selection as the MODELS.md tables

from segany.checkpoint import load_model
from segany.predictor import SamPredictor

CLICK_RADIUS = 5
FIRST_CLICK_REACH = 0.2
CLICK_REACH = 0.15  # of 0.05 / 0.1 / 0.15 / 0.2, the best GrabCut on the first 12 DAVIS val frames (MODELS.md)
ITERATIONS = 5


class GrabCutPredictor:
    """The part of the ``SamPredictor`` API the protocols use, answered by ``cv2.grabCut``.

    The "low-res logits" it returns are its full-size mask as +-1, which the click protocol hands back as
    ``mask_input`` on the next click.
    """

    def set_image(self, image: np.ndarray) -> None:
        self.image = np.ascontiguousarray(image[..., ::-1])  # OpenCV wants BGR

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        h, w = self.image.shape[:2]
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(box, dtype=np.float64).reshape(4))
            rect = (x0, y0, max(1, x1 - x0 + 1), max(1, y1 - y0 + 1))
            mask = np.zeros((h, w), np.uint8)
            mask[rect[1] : rect[1] + rect[3], rect[0] : rect[0] + rect[2]] = cv2.GC_PR_FGD
            _grabcut(self.image, mask, rect, bgd, fgd, cv2.GC_INIT_WITH_RECT)
        else:
            mask = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
            clicks = list(zip(np.asarray(point_coords, dtype=int), point_labels))
            if mask_input is not None:
                mask[np.asarray(mask_input)[0] > 0] = cv2.GC_PR_FGD
                for (x, y), label in clicks:  # in order: a later click's neighbourhood over an earlier one's
                    side = cv2.GC_PR_FGD if label == 1 else cv2.GC_PR_BGD
                    cv2.circle(mask, (int(x), int(y)), int(CLICK_REACH * min(h, w)), side, -1)
            else:
                x, y = (int(v) for v in point_coords[0])
                cv2.circle(mask, (x, y), int(FIRST_CLICK_REACH * min(h, w)), cv2.GC_PR_FGD, -1)
            for (x, y), label in clicks:
                cv2.circle(mask, (int(x), int(y)), CLICK_RADIUS, cv2.GC_FGD if label == 1 else cv2.GC_BGD, -1)
            _grabcut(self.image, mask, None, bgd, fgd, cv2.GC_INIT_WITH_MASK)
        out = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        logits = np.where(out, 1.0, -1.0).astype(np.float32)[None]
        return out[None], np.ones(1, np.float32), logits


def _grabcut(image: np.ndarray, mask: np.ndarray, rect, bgd: np.ndarray, fgd: np.ndarray, mode: int) -> None:
    """``cv2.grabCut`` in place on ``mask``; when the prompt leaves it no background (or no object) sample
    to fit a colour model to (a box over the whole image), the prompt's own region is the answer."""
    try:
        cv2.grabCut(image, mask, rect, bgd, fgd, ITERATIONS, mode)
    except cv2.error:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model name or file (default: default)")
    p.add_argument("--data", nargs="+", required=True, help="FOLDER[:SPLIT] label-map folders (held-out splits)")
    p.add_argument("--clicks", type=int, default=5, help="clicks per object (default: 5)")
    p.add_argument("--max-images", type=int, help="at most this many images per folder")
    p.add_argument("--max-objects", type=int, default=10, help="at most this many objects per image (default: 10)")
    p.add_argument("--min-area", type=int, default=100, help="skip objects smaller than this, in pixels (default: 100)")
    p.add_argument("--json", help="append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    methods = {"model": SamPredictor(load_model(args.model)), "grabcut": GrabCutPredictor()}
    rows = []
    for data in args.data:
        for name, predictor in methods.items():
            root, _, split = data.partition(":")
            t = time.perf_counter()
            row = {"data": data, "method": args.model if name == "model" else name}
            row.update(evaluate_set(predictor, Path(root), split or None, True, args.clicks, args.max_images,
                                    args.max_objects, args.min_area))
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for data in args.data:
        model_row, grab_row = [r for r in rows if r["data"] == data]
        keys = [k for k in ("mIoU@1", "mIoU@3", "mIoU@5", "box mIoU") if model_row.get(k) is not None]
        beaten = all(model_row[k] > grab_row[k] for k in keys)
        print(f"{data}: model {'beats' if beaten else 'does NOT beat'} GrabCut on " + ", ".join(
            f"{k} {model_row[k]:.3f} vs {grab_row[k]:.3f}" for k in keys))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
