"""Speed of the default model on this CPU: image embedding and one prompt to a full-size mask.

    python benchmarks/default_speed.py [--model default] [--size 1024] [--repeats 20] [--threads N]

Prints medians (ms). The embedding time includes the resize of a 1024-pixel image to the model's input
size and normalisation (what ``SamPredictor.set_image`` does); the prompt time is one ``predict`` call
with one point and ``multimask_output=False``, returning the binary mask at the original image size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=1024, help="longest side of the test image")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from segany import SamPredictor, load_model

    model = load_model(args.model)
    rng = np.random.default_rng(0)
    h, w = args.size * 3 // 4, args.size
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    pred = SamPredictor(model)
    emb = median_ms(lambda: pred.set_image(image), args.repeats)
    pt, lab = np.array([[w / 2, h / 2]]), np.array([1])
    one = median_ms(lambda: pred.predict(pt, lab, multimask_output=False), args.repeats * 5)
    multi = median_ms(lambda: pred.predict(pt, lab, multimask_output=True), args.repeats * 5)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    threads = torch.get_num_threads()
    print(f"model {args.model}: {params:.2f} M parameters, input {model.image_size} px, torch threads {threads}")
    print(f"image {w}x{h}: embedding median {emb:.1f} ms")
    print(f"one point -> full-size mask: median {one:.2f} ms (single), {multi:.2f} ms (3 masks)")


if __name__ == "__main__":
    main()
