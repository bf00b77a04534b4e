"""The default model's image encoder: the plain EfficientNet-Lite module against its fast path
(``segany.modeling.fast.efficientnet``: channels-last, convolution + ReLU6 fused), side by side.

    python benchmarks/efficientnet_fast_path.py [--model default] [--sizes 512 640 768] [--repeats 10] [--threads 1]

Same weights in both, timed round-robin (plain, fast, plain, ...) at each input size; prints the medians,
the speed-up and the largest difference between their maps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 640, 768])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from segany.checkpoint import load_model, with_image_size
    from segany.modeling import build_sam

    base = load_model(args.model, text_head=None)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}; encoder forward, median ms")
    print("| input | plain | fast | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        fast = with_image_size(base, size) if size != base.image_size else base
        plain = build_sam(fast.config, fast=False).eval()
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"plain": [], "fast": []}
        with torch.inference_mode():
            outs = {name: m.image_encoder(x) for name, m in (("plain", plain), ("fast", fast))}
            for _ in range(args.repeats + 2):
                for name, m in (("plain", plain), ("fast", fast)):
                    t = time.perf_counter()
                    m.image_encoder(x)
                    times[name].append((time.perf_counter() - t) * 1000)
        a, b = (outs[k] if isinstance(outs[k], list) else [outs[k]] for k in ("plain", "fast"))
        diff = max(float((p - f).abs().max()) for p, f in zip(a, b))
        mp, mf = (statistics.median(times[k][2:]) for k in ("plain", "fast"))
        print(f"| {size} | {mp:.1f} | {mf:.1f} | {mp / mf:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
