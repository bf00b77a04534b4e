"""How closely the training's batched clicker (accelerators) follows the exact standard clicker (CPU, evaluation).

    python benchmarks/batched_clicker.py [--images 30]

Held-out DAVIS and COCO instances objects, resized to the default model's 512-px input: first clicks (an
empty prediction) and corrections of a plausible wrong prediction (the object shifted by up to 12 pixels,
then dilated or eroded by 2). Prints, for each, how often the batched clicker's label (positive / negative)
is the exact clicker's, and the exact Euclidean depth of its click relative to the deepest pixel of the
error it corrects (1.0 = as deep as the exact clicker's click).
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch
from eval_default import held_out_objects

from segany.evaluation.clicks import inner_distance
from segany.training.prompts import batched_clicker_points, clicker_points


def objects_at(side: int, max_images: int) -> list[np.ndarray]:
    out = []
    for folder in ("davis2016_val", "coco_instances_mini"):
        for _sample, objects, _ in held_out_objects(folder, max_images):
            for _, gt, _ignore, _ in objects:
                h, w = gt.shape
                s = side / max(h, w)
                small = cv2.resize(gt.astype(np.uint8), (round(w * s), round(h * s)), interpolation=cv2.INTER_NEAREST)
                pad = np.zeros((side, side), bool)
                pad[: small.shape[0], : small.shape[1]] = small > 0
                if pad.sum() >= 100:
                    out.append(pad)
    return out


def wrong_predictions(gts: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    preds = []
    for g in gts:
        p = np.roll(g.astype(np.uint8), (int(rng.integers(-12, 13)), int(rng.integers(-12, 13))), (0, 1))
        kernel = np.ones((5, 5), np.uint8)
        p = cv2.dilate(p, kernel) if rng.random() < 0.5 else cv2.erode(p, kernel)
        preds.append(p > 0)
    return np.stack(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=30, help="held-out images per set")
    args = ap.parse_args()
    gts = objects_at(512, args.images)
    gt = torch.from_numpy(np.stack(gts))
    valid = torch.ones_like(gt)
    cases = {
        "first": torch.zeros_like(gt),
        "correction": torch.from_numpy(wrong_predictions(gts, np.random.default_rng(0))),
    }
    print(f"{len(gts)} objects")
    for name, pred in cases.items():
        _, exact_labels = clicker_points(pred, gt, valid)
        coords, labels = batched_clicker_points(pred, gt, valid)
        ratios = []
        for i, g in enumerate(gts):
            if int(labels[i]) < 0:
                continue
            p = pred[i].numpy()
            region = (g & ~p) if int(labels[i]) == 1 else (~g & p)
            depth = inner_distance(region)
            ratios.append(depth[int(coords[i, 1]), int(coords[i, 0])] / max(float(depth.max()), 1e-6))
        agree = float((labels == exact_labels).float().mean())
        print(
            f"{name}: label as the exact clicker's {agree:.3f}; depth of the click / deepest: mean "
            f"{np.mean(ratios):.3f}, 10th percentile {np.percentile(ratios, 10):.3f}"
        )


if __name__ == "__main__":
    main()
