"""Full-size parity of "segment everything" with the official generator, on random ViT-B weights.

Builds the official ``segment_anything`` ViT-B (1024 input) with random weights, makes its random mask
decoder give usable candidates on the test image (``tests/test_amg.py::make_masks_visible``: a few decoder
weights edited, see there), saves it as an official ``.pth`` and loads it with ``segany.load_model``. Then
both ``SamAutomaticMaskGenerator``s run on the same 512-pixel image (``examples/cat.jpg`` resized so its
long side is 512) with thresholds low enough for random weights, and the script prints the mask counts,
the smallest best-match IoU of a reference mask among ours, and the largest field differences.

    python benchmarks/amg_parity.py [--points-per-side 32] [--crop-n-layers 0] [--threads N]

Exit status 1 if the counts differ or a reference mask has no match at IoU >= 0.99.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import segany  # noqa: E402
from segany.automatic.generator import SamAutomaticMaskGenerator  # noqa: E402
from tests.reference import build_reference_vit, import_reference, save_official_checkpoint  # noqa: E402
from tests.test_amg import LOW_THRESHOLDS, make_masks_visible, match  # noqa: E402


def test_image(long_side: int = 512) -> np.ndarray:
    """``examples/cat.jpg`` (451 x 300) resized so that its long side is ``long_side`` pixels."""
    from PIL import Image

    img = Image.open(ROOT / "examples" / "cat.jpg").convert("RGB")
    scale = long_side / max(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    return np.asarray(img.resize(size, Image.BICUBIC), dtype=np.uint8).copy()


# ViT-B's decoder mixes 32 channels: without ``sparsity`` every mask is a union of many peaks, large, and
# box NMS keeps a handful; with it the masks are smaller and varied (about 50 survive the low thresholds).
SPARSITY = 0.2


def setup(tmp: Path, seed: int = 0, sparsity: float = SPARSITY):
    """(reference vit_b with visible masks, ours loaded from its official .pth, image, reference package)."""
    sa = import_reference()
    image = test_image()
    t = time.perf_counter()
    ref = build_reference_vit(seed=seed)  # the defaults are vit_b at 1024
    make_masks_visible(ref, sa.SamPredictor, image, sparsity=sparsity)
    path = save_official_checkpoint(ref, tmp / "sam_vit_b_random.pth")
    ours = segany.load_model(path)
    print(f"vit_b built, calibrated, saved and loaded in {time.perf_counter() - t:.1f}s; image {image.shape}")
    return ref, ours, image, sa


def field_diffs(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    out = {"area": 0.0, "bbox": 0.0, "predicted_iou": 0.0, "stability_score": 0.0, "point_coords": 0.0}
    for r, o in pairs:
        out["area"] = max(out["area"], abs(r["area"] - o["area"]))
        out["bbox"] = max(out["bbox"], float(np.abs(np.subtract(r["bbox"], o["bbox"])).max()))
        out["predicted_iou"] = max(out["predicted_iou"], abs(r["predicted_iou"] - o["predicted_iou"]))
        out["stability_score"] = max(out["stability_score"], abs(r["stability_score"] - o["stability_score"]))
        d = float(np.abs(np.subtract(r["point_coords"], o["point_coords"])).max())
        out["point_coords"] = max(out["point_coords"], d)
    out["crop_box mismatches"] = sum(r["crop_box"] != o["crop_box"] for r, o in pairs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    kwargs = {**LOW_THRESHOLDS, "points_per_side": args.points_per_side, "crop_n_layers": args.crop_n_layers}
    print(f"settings: {kwargs}")
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, image, sa = setup(Path(tmp))
        t = time.perf_counter()
        with torch.no_grad():
            ref_records = sa.SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        our_records = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
        t_our = time.perf_counter() - t
    pairs, worst = match(ref_records, our_records, "binary_mask")
    print(f"masks: reference {len(ref_records)}, segany {len(our_records)}")
    print(f"min over reference masks of the best IoU with ours: {worst:.5f}")
    diffs = ", ".join(f"{k} {v:g}" for k, v in field_diffs(pairs).items())
    print(f"largest field differences of matched pairs: {diffs}")
    areas = sorted(r["area"] for r in ref_records)
    if areas:
        print(f"reference mask areas: min {areas[0]}, median {areas[len(areas) // 2]}, max {areas[-1]} px")
    print(f"generate (embedding included): reference {t_ref:.1f}s, segany {t_our:.1f}s")
    ok = len(ref_records) == len(our_records) and worst >= 0.99
    print("PARITY OK" if ok else "PARITY FAILURE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
