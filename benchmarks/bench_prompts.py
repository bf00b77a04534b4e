"""Prompts to full-size masks, side by side: segany and the reference ``SamPredictor``, same weights.

ViT-B with random weights in the official layout (its random mask decoder edited so that masks are
blobs, see ``_common.build_pair``), ``examples/cat.jpg`` at 1024 x 683. The image embedding is computed
once by the reference and installed in both predictors, so only the prompt side is timed:

* one prompt: ``predict`` with one point, 3 masks (``multimask_output=True``) and 1 mask, binary masks at
  the original size; also the first prompt after ``set_image`` (segany keeps per-image work for the
  next prompts: here a fresh copy of the embedding each call, so nothing is reused);
* 64 prompts in one batch: ``predict_torch`` with 64 single points, 3 masks each, full size;
* opt-in: the ONNX Runtime decoder (``export_decoder``, ``OnnxSamPredictor``) for one prompt.

Prints medians, the speed-up over the reference and how close the outputs are (largest low-res logit
difference and the smallest mask IoU against the reference).

    python benchmarks/bench_prompts.py [--repeats 20] [--threads 2] [--quick] [--json results.jsonl]

``--quick``: a 256-pixel ViT-B and few repeats: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    build_pair,
    install_embedding,
    interleaved,
    mask_iou,
    print_machine,
    reference_package,
    row,
    save_results,
    set_threads,
    test_image,
)

import segany  # noqa: E402


def closeness(ref_out, our_out) -> dict[str, float]:
    """Largest low-res logit difference and smallest mask IoU between two (masks, iou, low_res) outputs."""
    r_masks, _, r_low = (torch.as_tensor(np.asarray(t)) for t in ref_out)
    o_masks, _, o_low = (torch.as_tensor(np.asarray(t)) for t in our_out)
    r_masks, o_masks = r_masks.reshape(-1, *r_masks.shape[-2:]), o_masks.reshape(-1, *o_masks.shape[-2:])
    ious = [mask_iou(a.numpy(), b.numpy()) for a, b in zip(r_masks, o_masks)]
    return {"max_low_res_diff": float((r_low.float() - o_low.float()).abs().max()), "mask_iou_min": min(ious)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime decoder")
    ap.add_argument("--quick", action="store_true", help="256-pixel model, 3 repeats: a smoke test")
    ap.add_argument("--json", help="append the results to this JSON-lines file")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 3
    threads = set_threads(args.threads)
    meta = print_machine()
    image = test_image(1024)
    h, w = image.shape[:2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, _path = build_pair("vit_b", Path(tmp), image=image, image_size=256 if args.quick else 1024)
        sa = reference_package("vit_b")
        ref_pred, our_pred = sa.SamPredictor(ref), segany.SamPredictor(ours)
        with torch.no_grad():
            ref_pred.set_image(image)
        emb, sizes = ref_pred.features, (ref_pred.original_size, ref_pred.input_size)
        install_embedding(our_pred, emb, *sizes)
        print(f"vit_b at {ours.image_size}, image {w}x{h}; embedding computed once (reference), installed in both")

        point = {"point_coords": np.array([[0.45 * w, 0.55 * h]]), "point_labels": np.array([1])}
        for mm in (True, False):

            def ref_one(mm=mm):
                with torch.no_grad():
                    return ref_pred.predict(**point, multimask_output=mm)

            def our_one(mm=mm):
                return our_pred.predict(**point, multimask_output=mm)

            t = interleaved({"ref": ref_one, "ours": our_one}, args.repeats)
            label = f"one prompt -> {3 if mm else 1} full-size mask{'s' if mm else ''}"
            rows.append(row(label, t["ref"], t["ours"], **closeness(ref_one(), our_one())))

        fresh = segany.SamPredictor(ours)

        def our_first():
            install_embedding(fresh, emb.clone(), *sizes)  # a new tensor: no per-image work to reuse
            return fresh.predict(**point, multimask_output=True)

        t = interleaved({"ref": lambda: ref_one(True), "ours": our_first}, args.repeats)
        rows.append(row("first prompt after set_image -> 3 masks", t["ref"], t["ours"]))

        rng = np.random.default_rng(0)
        pts = torch.as_tensor(rng.uniform(0.05, 0.95, (64, 1, 2)) * np.array([w, h]), dtype=torch.float)
        coords = ref_pred.transform.apply_coords_torch(pts, ref_pred.original_size)
        labels = torch.ones(64, 1, dtype=torch.int)

        def ref_batch():
            with torch.no_grad():
                return ref_pred.predict_torch(coords, labels, multimask_output=True)

        def our_batch():
            return our_pred.predict_torch(coords, labels, multimask_output=True)

        t = interleaved({"ref": ref_batch, "ours": our_batch}, max(1, args.repeats // 4))
        rows.append(
            row(
                "64 prompts in one batch -> 192 full-size masks",
                t["ref"],
                t["ours"],
                **closeness(ref_batch(), our_batch()),
            )
        )

        if not args.no_onnx:
            from segany.export.onnx import export_decoder
            from segany.export.onnx_predictor import OnnxSamPredictor

            onnx_pred = OnnxSamPredictor(None, export_decoder(ours, Path(tmp) / "decoder.onnx"), threads=threads)
            onnx_pred.set_embedding(emb.numpy(), ref_pred.original_size)

            def ort_one():
                return onnx_pred.predict(**point, multimask_output=True)

            t = interleaved({"ref": lambda: ref_one(True), "ours": ort_one}, args.repeats)
            rows.append(
                row(
                    "one prompt -> 3 masks, ONNX Runtime decoder",
                    t["ref"],
                    t["ours"],
                    **closeness(ref_one(True), ort_one()),
                )
            )
    save_results(args.json, "prompts", meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
