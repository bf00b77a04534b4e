"""Full-size parity check against the official implementations, with random weights.

For SAM ViT-B (``segment_anything``) and MobileSAM's TinyViT (``mobile_sam``), both at 1024: build the
reference model with randomized weights, save it in the official checkpoint layout, load it with
``segany.load_model`` (no model type), then run both ``SamPredictor``s on the same image and print the
largest differences per prompt kind and the timing of each image embedding.

    python benchmarks/parity.py [--models vit_b vit_t] [--repeats 2] [--threads N]

Exit status 1 if a difference exceeds the tolerances (low-res logits 1e-4 by default, IoU 1e-5).
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
from tests.reference import (  # noqa: E402
    build_reference_tiny_vit,
    build_reference_vit,
    import_mobile_sam,
    import_reference,
    save_official_checkpoint,
)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-8, 9, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def maxdiff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)).double() if not isinstance(a, torch.Tensor) else a.double()
    b = torch.as_tensor(np.asarray(b)).double() if not isinstance(b, torch.Tensor) else b.double()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max())


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def prompts(h: int, w: int, ref_pred) -> list[tuple[str, dict]]:
    """(name, predict kwargs) for every prompt kind; the mask prompt is the reference's best mask."""
    one = np.array([[0.37 * w, 0.55 * h]])
    multi = np.array([[0.2 * w, 0.3 * h], [0.7 * w, 0.6 * h], [0.5 * w, 0.9 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.75 * h])
    with torch.no_grad():
        _, iou, low = ref_pred.predict(point_coords=one, point_labels=np.array([1]))
    mask = low[int(np.argmax(iou))][None]
    kinds = [
        ("one point", {"point_coords": one, "point_labels": np.array([1])}),
        ("points +/-", {"point_coords": multi, "point_labels": np.array([1, 0, 1])}),
        ("box", {"box": box}),
        ("box + point", {"box": box, "point_coords": one, "point_labels": np.array([0])}),
        ("point + mask", {"point_coords": one, "point_labels": np.array([1]), "mask_input": mask}),
        ("mask only", {"mask_input": mask}),
    ]
    return [(f"{n} mm={mm}", {**kw, "multimask_output": mm}) for n, kw in kinds for mm in (True, False)]


def run_one(name: str, repeats: int, logit_tol: float, iou_tol: float, tmp: Path) -> bool:
    print(f"\n=== {name} (1024, random weights) ===", flush=True)
    t = time.perf_counter()
    if name == "vit_b":
        pkg = import_reference()
        ref = build_reference_vit(seed=0)  # the defaults are vit_b
        path = save_official_checkpoint(ref, tmp / "sam_vit_b_random.pth")
    elif name == "vit_t":
        pkg = import_mobile_sam()
        ref = build_reference_tiny_vit(seed=0)  # the defaults are MobileSAM's vit_t
        path = save_official_checkpoint(ref, tmp / "mobile_sam_random.pt")
    else:
        raise SystemExit(f"unknown model {name!r} (vit_b, vit_t)")
    ours = segany.load_model(path)
    enc = ours.config.encoder
    print(
        f"built + saved + loaded in {time.perf_counter() - t:.1f}s; detected: image_size={ours.config.image_size} "
        f"encoder={enc}",
        flush=True,
    )

    image = smooth_image(600, 800, seed=3)
    h, w = image.shape[:2]
    ref_pred, our_pred = pkg.SamPredictor(ref), segany.SamPredictor(ours)
    r_in, o_in = ref_pred.transform.apply_image(image), our_pred.transform.apply_image(image)
    same = r_in.shape == o_in.shape and np.array_equal(r_in, o_in)
    px = "" if same or r_in.shape != o_in.shape else f", max pixel diff {np.abs(r_in.astype(int) - o_in).max()}"
    print(f"resized input {r_in.shape} vs {o_in.shape}: {'identical' if same else 'DIFFERENT' + px}")

    def ref_set():
        with torch.no_grad():
            ref_pred.set_image(image)

    t_ref = timed(ref_set, repeats)
    t_our = timed(lambda: our_pred.set_image(image), repeats)
    print(
        f"embedding time  reference: {', '.join(f'{x:.2f}s' for x in t_ref)}   "
        f"segany: {', '.join(f'{x:.2f}s' for x in t_our)}   (image {h}x{w}, {torch.get_num_threads()} threads)"
    )
    r_emb, o_emb = ref_pred.get_image_embedding(), our_pred.get_image_embedding()
    d_emb = maxdiff(o_emb, r_emb)
    peak = float(r_emb.abs().max())
    print(f"embedding {tuple(r_emb.shape)}: max abs diff {d_emb:.2e} (reference max |x| {peak:.2f})")

    ok = True
    print(f"{'prompt':<28}{'low-res':>10}{'iou':>10}{'logits':>10}{'mask px':>9}  ref {'ms':>5} ours {'ms':>5}")
    worst_low = worst_iou = 0.0
    cases = prompts(h, w, ref_pred)
    # predict_torch, batched
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.95, 0.9], [0.0, 0.5, 0.4, 1.0]]) * torch.tensor(
        [w, h, w, h], dtype=torch.float
    )
    boxes = ref_pred.transform.apply_boxes_torch(boxes, ref_pred.original_size)
    coords = torch.as_tensor(np.random.default_rng(7).uniform(0, 1, (4, 3, 2)) * np.array([w, h]), dtype=torch.float)
    coords = ref_pred.transform.apply_coords_torch(coords, ref_pred.original_size)
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, -1, -1]], dtype=torch.int)
    torch_cases = [
        (f"torch 3 boxes mm={mm}", {"point_coords": None, "point_labels": None, "boxes": boxes, "multimask_output": mm})
        for mm in (True, False)
    ] + [
        (f"torch 4 point sets mm={mm}", {"point_coords": coords, "point_labels": labels, "multimask_output": mm})
        for mm in (True, False)
    ]
    for label, kw in cases + torch_cases:
        fn_r = ref_pred.predict_torch if label.startswith("torch") else ref_pred.predict
        fn_o = our_pred.predict_torch if label.startswith("torch") else our_pred.predict
        t = time.perf_counter()
        with torch.no_grad():
            r_logits, r_iou, r_low = fn_r(**kw, return_logits=True)
        t_r = time.perf_counter() - t
        t = time.perf_counter()
        o_logits, o_iou, o_low = fn_o(**kw, return_logits=True)
        t_o = time.perf_counter() - t
        o_masks, _, _ = fn_o(**kw)
        r_logits_t = torch.as_tensor(np.asarray(r_logits)) if not isinstance(r_logits, torch.Tensor) else r_logits
        o_masks_t = torch.as_tensor(np.asarray(o_masks)) if not isinstance(o_masks, torch.Tensor) else o_masks
        bad_px = int(((o_masks_t != (r_logits_t > 0)) & (r_logits_t.abs() >= logit_tol)).sum())
        d_low, d_iou, d_log = maxdiff(o_low, r_low), maxdiff(o_iou, r_iou), maxdiff(o_logits, r_logits)
        worst_low, worst_iou = max(worst_low, d_low), max(worst_iou, d_iou)
        flag = "" if (d_low <= logit_tol and d_iou <= iou_tol and bad_px == 0) else "  <-- FAIL"
        ok &= not flag
        print(
            f"{label:<28}{d_low:>10.2e}{d_iou:>10.2e}{d_log:>10.2e}{bad_px:>9d}  "
            f"ref {t_r * 1e3:5.0f} ours {t_o * 1e3:5.0f}{flag}",
            flush=True,
        )
    print(
        f"{name}: worst low-res {worst_low:.2e} (tol {logit_tol:g}), worst iou {worst_iou:.2e} (tol {iou_tol:g}), "
        f"embedding {d_emb:.2e}: {'OK' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_t"])
    ap.add_argument("--repeats", type=int, default=2, help="embedding timings per implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--logit-tol", type=float, default=1e-4)
    ap.add_argument("--iou-tol", type=float, default=1e-5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, segany {segany.__version__}, {torch.get_num_threads()} threads")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ok &= run_one(name, args.repeats, args.logit_tol, args.iou_tol, Path(tmp))
    print("\nALL OK" if ok else "\nPARITY FAILURES (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
