"""A click of the default model, side by side with its own alternatives in one process: the mask decoder with
and without the input's padding decoded (``SamConfig.decode_padding``), and the point refiner's inference path
against the plain refiner (fp32, every map sampled).

    python benchmarks/click_speed.py [--model default] [--threads 1] [--repeats 100]

On the README's cat resized to 1024 x 681 (encoded at 832 px), a click at its centre: the median ms of each
way, timed in alternation, their ratio, and the largest difference of the outputs (the decoder's masks over the
image are the same; the refiner's bf16 products move the refined logits by ~1e-2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import interleaved, median, set_threads

from segany import SamPredictor, load_model
from segany.io.images import load_image
from segany.modeling.build import build_sam, with_settings
from segany.modeling.point_refiner import PointRefiner, RefinerPrompts
from segany.perf import reuse_freed_memory, use_huge_pages


def _row(name: str, times: dict[str, list[float]], diff: float) -> None:
    (a, ta), (b, tb) = times.items()
    ma, mb = median(ta) * 1e3, median(tb) * 1e3
    print(f"| {name} | {a} {ma:.2f} | {b} {mb:.2f} | {ma / mb:.2f}x | {diff:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    use_huge_pages()  # as the segany command
    reuse_freed_memory()
    set_threads(args.threads)
    model = load_model(args.model)
    cat = load_image(str(Path(__file__).resolve().parents[1] / "examples" / "cat.jpg"))
    scale = 1024 / max(cat.shape[:2])
    image = cv2.resize(cat, (round(cat.shape[1] * scale), round(cat.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
    h, w = image.shape[:2]
    point, label = np.array([[w / 2, h / 2]]), np.array([1])
    print("| part | A (ms) | B (ms) | A / B | max difference |")
    print("|---|---|---|---|---|")

    # the whole click, the model decoding its input's padding (A) or not (B)
    preds = {}
    for padding in (True, False):
        p = SamPredictor(with_settings(model, decode_padding=padding))
        p.set_image(image)
        preds["padding decoded" if padding else "image only"] = p
    for name, multimask, repeats in (("one point -> full-size mask", False, args.repeats), ("3 masks", True, 30)):
        clicks = {k: (lambda p=p, m=multimask: p.predict(point, label, multimask_output=m)) for k, p in preds.items()}
        a, b = (p.predict(point, label, multimask_output=multimask, return_logits=True)[0] for p in preds.values())
        _row(name, interleaved(clicks, repeats, warmup=3), float(np.abs(a - b).max()))

    # the point refiner on the same upsampled mask: the plain refiner's path (A) against the fast one's (B)
    pred = preds["image only"]
    refiner = pred.model.point_refiner
    with torch.inference_mode():
        coords = torch.as_tensor(pred.transform.apply_coords(point, pred.original_size), dtype=torch.float)[None]
        labels = torch.as_tensor(label, dtype=torch.int)[None]
        low, _ = pred.predict_low_res(coords, labels, multimask_output=False)
        up = pred.model.postprocess_masks(low, pred.input_size, pred.original_size)
        maps = [*pred.decoder_inputs["high_res_features"], pred.features]
        prompts = RefinerPrompts(coords, labels)

        plain = build_sam(pred.model.config, fast=False).point_refiner.eval()  # the plain modules' refiner
        plain.load_state_dict(refiner.state_dict())

        def run(module: PointRefiner) -> torch.Tensor:
            return module(up.clone(), low, pred.refiner_image, maps, pred.input_size, prompts)

        diff = float((run(plain) - run(refiner)).abs().max())
        refine = {"plain refiner": lambda: run(plain), "fast refiner": lambda: run(refiner)}
        _row("point refiner (2,048 pixels)", interleaved(refine, args.repeats, warmup=5), diff)


if __name__ == "__main__":
    main()
