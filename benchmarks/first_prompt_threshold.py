"""Where to cut a model's refined answers to first prompts (``SamConfig.first_prompt_threshold``), on training images.

For every object (of each set's images, or its first ``--max-images``; up to 10 objects of at least 100 pixels an image,
as the held-out protocols choose them), the standard clicker's first click (the mask with the highest predicted IoU
kept) and the tight box are answered once, as logits; each is cut at every candidate value and its IoU taken. Prints
the mean IoU per set, prompt and cut, and the cut best over all objects (each one's click and box together).
The default model's -0.5 was chosen so (MODELS.md: "The refined first answers cut lower").

    python benchmarks/first_prompt_threshold.py --model default \
        --data ../shared/data/coco_instances_mini:train ../shared/data/davis2016_val:davis_train
"""

from __future__ import annotations

import argparse

import numpy as np

from segany.checkpoint import load_model
from segany.evaluation.clicks import clicks_to_prompt, next_click
from segany.evaluation.metrics import mask_iou
from segany.evaluation.protocols import _select_objects, load_samples, mask_to_box
from segany.predictor import SamPredictor

CUTS = (-1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5)


def answers(predictor: SamPredictor, root: str, split: str, max_images: int | None) -> dict[str, list[np.ndarray]]:
    """Per prompt kind ("click", "box"), one row of IoUs (at each of ``CUTS``) per object."""
    rows: dict[str, list[np.ndarray]] = {"click": [], "box": []}
    for sample in load_samples(root, split, max_images):
        objects, _ = _select_objects(sample, 100, 10)  # as the held-out tables choose them
        if not objects:
            continue
        predictor.set_image(sample.image)
        for _i, gt, ignore, _area in objects:
            coords, labels = clicks_to_prompt([next_click(gt, np.zeros(gt.shape, bool), ignore)])
            logits, scores, _ = predictor.predict(coords, labels, multimask_output=True, return_logits=True)
            kept = logits[int(np.argmax(scores))]
            box = predictor.predict(box=mask_to_box(gt), multimask_output=False, return_logits=True)[0][0]
            for kind, answer in (("click", kept), ("box", box)):
                rows[kind].append(np.array([mask_iou(answer > c, gt, ignore) for c in CUTS]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", nargs="+", required=True, help="FOLDER:SPLIT, training splits only")
    ap.add_argument("--max-images", type=int, default=None, help="the first N images of each set (default: all)")
    args = ap.parse_args()
    predictor = SamPredictor(load_model(args.model, text_head=None))
    print("| set, prompt (objects) | " + " | ".join(f"{c:+.2f}" for c in CUTS) + " |")
    print("|---|" + "---|" * len(CUTS))
    pooled = []
    for spec in args.data:
        root, _, split = spec.partition(":")
        for kind, rows in answers(predictor, root, split or None, args.max_images).items():
            means = np.mean(rows, axis=0)
            print(f"| {root.rstrip('/').split('/')[-1]} {split}, {kind} ({len(rows)}) | "
                  + " | ".join(f"{m:.4f}" for m in means) + " |")
            pooled += rows
    means = np.mean(pooled, axis=0)
    best = int(np.argmax(means))
    print(f"\nbest over every object's click and box: {CUTS[best]:+.2f} (mean IoU {means[best]:.4f}; "
          f"at 0: {means[CUTS.index(0.0)]:.4f})")


if __name__ == "__main__":
    main()
