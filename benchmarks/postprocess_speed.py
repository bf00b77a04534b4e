"""Mask post-processing on the CPU: SAM's two interpolations against OpenCV's resizes in
``segany.modeling.fast.postprocess``, side by side, from a photo of the model's size to a 6000 x 4000 one.

    python benchmarks/postprocess_speed.py [--threads 1] [--repeats 10]

For each model input size, photo size and mask count it prints the median time of both ways (timed in
alternation, OpenCV and torch at ``--threads``), their ratio and the largest logit difference (the same
function up to float rounding: OpenCV places the source pixels in double precision, torch in float).
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, median, set_threads

from segany.modeling.fast import postprocess
from segany.modeling.sam import interpolate_masks
from segany.transforms import get_preprocess_shape

SIZES = [(681, 1024), (1080, 1920), (1536, 2048), (2448, 3264), (3000, 4000), (4000, 6000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    set_threads(args.threads)
    print("| model input | photo | masks | output | interpolations (ms) | OpenCV (ms) | ratio | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for image_size in (640, 1024):
            low = image_size // 4
            for size in SIZES:
                inp = get_preprocess_shape(size[0], size[1], image_size)
                for masks, thresholded in ((1, True), (3, True), (1, False)):
                    x = torch.randn(1, masks, low, low) * 4
                    thr = 0.0 if thresholded else None

                    def plain(x=x, s=image_size, inp=inp, size=size, thr=thr):
                        out = interpolate_masks(x, (s, s), inp, size)
                        return out if thr is None else postprocess.greater(out, thr)

                    def fast(x=x, s=image_size, inp=inp, size=size, thr=thr):
                        return postprocess.postprocess_masks(x, s, inp, size, threshold=thr)

                    times = interleaved({"plain": plain, "fast": fast}, args.repeats)
                    a, b = (median(times[k]) * 1000 for k in ("plain", "fast"))
                    diff = float((postprocess.postprocess_masks(x, image_size, inp, size)
                                  - interpolate_masks(x, (image_size, image_size), inp, size)).abs().max())
                    kind = "masks" if thresholded else "logits"
                    print(f"| {image_size} | {size[1]}x{size[0]} | {masks} | {kind} | {a:.2f} | {b:.2f} | "
                          f"{a / b:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
