"""Full-size parity and side-by-side speed for SAM 2 / 2.1, SAM-HQ and Hugging Face SAM, random weights.

For each model: the reference is built at full size by its own package (``sam2``'s ``build_sam2`` with its
own configs, ``segment_anything_hq``, transformers' ``SamModel``), randomized, saved in its official layout
(``{"model": ...}`` ``.pt``, ``.pth``, a ``save_pretrained`` folder) and loaded by ``segany.load_model``
with no model type. Both run in this process on the same threads, timed round-robin; the script prints the
embedding times, one prompt's time, and per prompt kind the largest low-res logit and IoU differences and
the fraction of full-size mask pixels that agree.

    python benchmarks/parity_new_families.py [--models sam2.1_t sam2.1_s ...] [--repeats 2] [--threads 2]
        [--out results.jsonl]

Exit status 1 if a difference exceeds the tolerances (logits 1e-4; IoUs 1e-5, 5e-5 for transformers,
whose decoder LayerNorms use eps 1e-6 where SAM's use 1e-5).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import interleaved, print_machine, row, save_results, set_threads, test_image

import segany
from tests.reference import randomize_, save_official_checkpoint
from tests.reference.sam2_reference import build_reference_sam2, reference_predictor, save_official_sam2
from tests.reference.sam_hq_reference import build_reference_sam_hq, import_sam_hq

SAM2_CONFIGS = {
    "sam2.1_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_t": "configs/sam2/sam2_hiera_t.yaml",
}
ALL = [*SAM2_CONFIGS, "hq_vit_b", "hf_vit_b"]


def prompt_kinds(h: int, w: int, best_low: np.ndarray | None) -> list[tuple[str, dict[str, Any]]]:
    one = np.array([[0.37 * w, 0.55 * h]])
    multi = np.array([[0.2 * w, 0.3 * h], [0.7 * w, 0.6 * h], [0.5 * w, 0.9 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.75 * h])
    kinds = [
        ("one point", {"point_coords": one, "point_labels": np.array([1])}),
        ("points +/-", {"point_coords": multi, "point_labels": np.array([1, 0, 1])}),
        ("box", {"box": box}),
        ("box + point", {"box": box, "point_coords": one, "point_labels": np.array([0])}),
    ]
    if best_low is not None:
        kinds.append(("point + mask", {"point_coords": one, "point_labels": np.array([1]), "mask_input": best_low}))
    return [(f"{n} mm={mm}", {**kw, "multimask_output": mm}) for n, kw in kinds for mm in (True, False)]


def compare_predictors(ref_pred, our_pred, image: np.ndarray, iou_tol: float, extra: dict | None = None) -> bool:
    """Every prompt kind through both predictors (logits): prints the differences; True if within tolerance."""
    h, w = image.shape[:2]
    extra = extra or {}
    with torch.no_grad():
        _, iou, low = ref_pred.predict(point_coords=np.array([[0.37 * w, 0.55 * h]]), point_labels=np.array([1]))
    ok = True
    for name, kw in prompt_kinds(h, w, low[int(np.argmax(iou))][None]):
        with torch.no_grad():
            rm, ri, rl = ref_pred.predict(**kw, **extra, return_logits=True)
        om, oi, ol = our_pred.predict(**kw, **extra, return_logits=True)
        d_low, d_iou = float(np.abs(ol - rl).max()), float(np.abs(oi - ri).max())
        agree = float(((om > 0) == (rm > 0)).mean())
        good = d_low <= 1e-4 and d_iou <= iou_tol
        ok &= good
        flag = "" if good else "  FAIL"
        print(f"    {name:24s} logits {d_low:.1e}  IoU {d_iou:.1e}  mask agreement {agree:.6f}{flag}")
    return ok


def time_predictors(name: str, rp, op, image: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Round-robin times of both predictors: ``set_image``, then one point -> 3 full-size masks."""
    emb = interleaved({"reference": lambda: rp.set_image(image), "segany": lambda: op.set_image(image)}, repeats, 0)
    rows = [row(f"{name} embedding", emb["reference"], emb["segany"])]
    pt = {"point_coords": np.array([[300.0, 200.0]]), "point_labels": np.array([1])}
    pr = interleaved({"reference": lambda: rp.predict(**pt), "segany": lambda: op.predict(**pt)}, max(10, 5 * repeats))
    rows.append(row(f"{name} one point -> 3 masks", pr["reference"], pr["segany"]))
    return rows


def run_sam2(name: str, tmp: Path, image: np.ndarray, repeats: int) -> tuple[bool, list]:
    ref = build_reference_sam2(SAM2_CONFIGS[name], seed=0)
    path = save_official_sam2(ref, tmp / f"{name}.pt")
    ours = segany.load_model(path)
    rp, op = reference_predictor(ref), segany.SamPredictor(ours)
    print(f"  {name}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters (image model)")
    _set(rp, op, image)
    ok = compare_predictors(rp, op, image, 1e-5)
    return ok, time_predictors(name, rp, op, image, repeats)


def _set(rp, op, image: np.ndarray) -> None:
    """The image into both predictors; prints the largest embedding difference."""
    with torch.no_grad():
        rp.set_image(image)
    op.set_image(image)
    d = float((rp.get_image_embedding() - op.get_image_embedding()).abs().max())
    print(f"    embedding max diff {d:.1e}")


def run_hq(tmp: Path, image: np.ndarray, repeats: int) -> tuple[bool, list]:
    ref = build_reference_sam_hq(seed=0)  # ViT-B
    path = save_official_checkpoint(ref, tmp / "sam_hq_vit_b.pth")
    ours = segany.load_model(path)
    rp, op = import_sam_hq().SamPredictor(ref), segany.SamPredictor(ours)
    _set(rp, op, image)
    ok = True
    for hq_only in (False, True):
        print(f"    hq_token_only={hq_only}")
        ok &= compare_predictors(rp, op, image, 1e-5, {"hq_token_only": hq_only})
    return ok, time_predictors("sam_hq_vit_b", rp, op, image, repeats)


def run_hf(tmp: Path, image: np.ndarray, repeats: int) -> tuple[bool, list]:
    """transformers' SamModel at sam-vit-base's size; compared on the same encoder input and prompts."""
    from transformers import SamConfig, SamModel

    ref = randomize_(SamModel(SamConfig()), seed=0, extra={"positional_embedding": 1.0}).eval()
    folder = tmp / "sam-vit-base"
    ref.save_pretrained(folder)
    ours = segany.load_model(folder)
    op = segany.SamPredictor(ours)
    x = ours.preprocess(torch.as_tensor(op.transform.apply_image(image)).permute(2, 0, 1)[None].float())
    with torch.inference_mode():
        emb_ref, emb_ours = ref.get_image_embeddings(x), ours.image_encoder(x)
    print(f"    embedding max diff {float((emb_ref - emb_ours).abs().max()):.1e}")
    pts, labels = torch.tensor([[[400.0, 300.0], [700.0, 500.0]]]), torch.tensor([[1, 0]])
    box = torch.tensor([[100.0, 150.0, 800.0, 600.0]])
    ok = True
    for name, p, b in (("points +/-", True, False), ("box", False, True), ("box + points", True, True)):
        for mm in (True, False):
            kw = {}
            if p:
                kw.update(input_points=pts[:, None], input_labels=labels[:, None])
            if b:
                kw.update(input_boxes=box[:, None])
            with torch.inference_mode():
                out = ref(image_embeddings=emb_ref, multimask_output=mm, **kw)
                sparse, dense = ours.prompt_encoder((pts, labels.int()) if p else None, box if b else None, None)
                low, iou = ours.mask_decoder(emb_ours, ours.prompt_encoder.get_dense_pe(), sparse, dense, mm)
            d_low = float((low - out.pred_masks[:, 0]).abs().max())
            d_iou = float((iou - out.iou_scores[:, 0]).abs().max())
            agree = float(((low > 0) == (out.pred_masks[:, 0] > 0)).float().mean())
            good = d_low <= 1e-4 and d_iou <= 5e-5
            ok &= good
            print(f"    {name} mm={mm}: logits {d_low:.1e}  IoU {d_iou:.1e}  low-res mask agreement {agree:.6f}")

    def ref_embed():
        with torch.inference_mode():
            ref.get_image_embeddings(x)

    emb = interleaved({"reference": ref_embed, "segany": lambda: op.set_image(image)}, repeats, warmup=0)
    return ok, [row("hf sam-vit-base embedding", emb["reference"], emb["segany"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="append the timing rows as a JSON line")
    args = ap.parse_args()
    set_threads(args.threads)
    meta = print_machine()
    image = test_image(1024)
    all_ok, rows = True, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"{name}:", flush=True)
            if name in SAM2_CONFIGS:
                ok, r = run_sam2(name, Path(tmp), image, args.repeats)
            elif name == "hq_vit_b":
                ok, r = run_hq(Path(tmp), image, args.repeats)
            else:
                ok, r = run_hf(Path(tmp), image, args.repeats)
            all_ok &= ok
            rows += r
            for f in Path(tmp).iterdir():  # full-size checkpoints: free the disk between models
                if f.is_file():
                    f.unlink()
    save_results(args.out, "parity_new_families", meta, rows)
    print("parity:", "all within tolerance" if all_ok else "FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
