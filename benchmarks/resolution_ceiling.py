"""The best IoU a model of a given input size and mask grid could reach on the held-out objects.

    python benchmarks/resolution_ceiling.py [--model default] [--sets davis2016_val] [--by-sequence]

A perfect prediction still makes the round trip every prediction makes: the object at the model's input
size (the longest side resized to ``image_size``), averaged onto the low-res mask grid the decoder
predicts (4x the embedding, e.g. 128 x 128 for a 512-px input), then upsampled back to the original frame
and thresholded, as ``Sam.postprocess_masks`` does. The IoU of that round trip against the object's own
mask bounds any model with that geometry: thin parts (lines, spokes, strings) narrower than a grid cell
are lost whatever the weights. Printed for the model's geometry, a grid twice as fine, and the input
resolution itself, and for SAM's geometry; and for the model's grid with each cell wholly in or out, the
bound of a model that places no boundary inside a cell. The objects are chosen as
``benchmarks/eval_default.py`` chooses them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from eval_default import DATA, SPLITS, held_out_objects

from segany import load_model
from segany.evaluation.metrics import mask_iou
from segany.transforms import get_preprocess_shape


def round_trip(gt: np.ndarray, image_size: int, grid: int, hard: bool = False) -> torch.Tensor:
    """``H x W`` bool mask -> low-res logits ``1 x 1 x grid x grid`` of the perfect prediction: each cell's
    share of the object minus 1/2 (the boundary placed inside the cell), or with ``hard`` only its sign (each
    cell wholly in or out: what a loss on thresholded low-res targets teaches, the trainer's ``low_res``)."""
    h, w = get_preprocess_shape(*gt.shape, image_size)
    m = torch.from_numpy(gt.astype(np.float32))[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, image_size - w, 0, image_size - h))
    share = F.interpolate(m, (grid, grid), mode="area") - 0.5
    return torch.sign(share) if hard else share


def upsample(logits: torch.Tensor, image_size: int, shape: tuple[int, int]) -> np.ndarray:
    """What ``Sam.postprocess_masks`` does, for any geometry: low-res logits -> ``H x W`` bool."""
    h, w = get_preprocess_shape(*shape, image_size)
    up = F.interpolate(logits, (image_size, image_size), mode="bilinear", align_corners=False)[..., :h, :w]
    return (F.interpolate(up, shape, mode="bilinear", align_corners=False) > 0)[0, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="the geometry (input size, mask grid) of this model")
    ap.add_argument("--sets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--max-objects", type=int, default=10)
    ap.add_argument("--min-area", type=int, default=100)
    ap.add_argument("--by-sequence", action="store_true", help="also per video sequence (DAVIS)")
    args = ap.parse_args()
    model = load_model(args.model, text_head=None)
    size, grid = model.image_size, model.prompt_encoder.mask_input_size[0]
    geometries = {
        f"{size} px, grid {grid}": (size, grid, False),
        f"{size} px, grid {grid}, cells in or out": (size, grid, True),
        f"{size} px, grid {2 * grid}": (size, 2 * grid, False),
        f"{size} px, grid {size}": (size, size, False),
        "1024 px, grid 256 (SAM's)": (1024, 256, False),
    }
    for folder in args.sets:
        if not (DATA / folder).is_dir():
            print(f"skipping {folder}: {DATA / folder} not found")
            continue
        ious: dict[str, list[float]] = defaultdict(list)
        groups: list[str | None] = []
        for _, objects, group in held_out_objects(folder, None, args.min_area, args.max_objects):
            for _, gt, ignore, _ in objects:
                for name, (s, g, hard) in geometries.items():
                    logits = round_trip(gt, s, g, hard)
                    pred = upsample(logits, s, gt.shape)
                    if (s, g, hard) == (size, grid, False):  # the model's own postprocessing does the same
                        own = model.postprocess_masks(logits, get_preprocess_shape(*gt.shape, s), gt.shape, 0.0)
                        assert np.array_equal(own[0, 0].numpy(), pred)
                    ious[name].append(mask_iou(pred, gt, ignore))
                groups.append(group)
        rows = {
            name: {
                "objects": len(v),
                "mean": round(float(np.mean(v)), 4),
                "p10": round(float(np.percentile(v, 10)), 4),
                "below 0.85": int(np.sum(np.array(v) < 0.85)),
            }
            for name, v in ious.items()
        }
        print(json.dumps({"set": folder, "ceilings": rows}))
        if args.by_sequence and groups and groups[0] is not None:
            for g in sorted(set(groups)):
                keep = np.array([x == g for x in groups])
                means = {name: round(float(np.array(v)[keep].mean()), 3) for name, v in ious.items()}
                print(json.dumps({"set": folder, "sequence": g, "objects": int(keep.sum()), **means}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
