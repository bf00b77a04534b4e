"""The default model's image encoder: the plain EfficientNet-Lite module against its fast path
(``segany.modeling.fast.efficientnet``: channels-last, convolution + ReLU6 fused), side by side.

    python benchmarks/efficientnet_fast_path.py [--model default] [--sizes 512 640 768] [--repeats 10] [--threads 1]

Same weights in both, timed round-robin (plain, fast, plain, ...) at each input size; prints the medians,
the speed-up and the largest difference between their maps. The middle column is the fast path as it was
before its stride-2 layers took TensorFlow's "SAME" padding as a larger kernel: the input copied into a
padded tensor first (what the plain module still does).
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
    import segany.modeling.fast.efficientnet as fast_efficientnet
    from segany.checkpoint import load_model
    from segany.checkpoint_convert import with_image_size
    from segany.modeling import build_sam

    symmetric = fast_efficientnet.conv_act

    def padded_copy(m, x):  # the fast path with the padding copied, as before
        if m.stride[0] == 1 or x.dtype != torch.float32:
            return symmetric(m, x)
        attr, scalars = ("hardtanh", [0.0, 6.0]) if m.act else ("none", [])
        return torch.ops.mkldnn._convolution_pointwise(
            m.pad_same(x), m.weight, m.bias, [0, 0], list(m.stride), [1, 1], m.groups, attr, scalars, ""
        )

    base = load_model(args.model, text_head=None)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}; encoder forward, median ms")
    print("| input | plain | fast, padding copied | fast | speed-up over plain | over padding copied | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        fast = with_image_size(base, size) if size != base.image_size else base
        plain = build_sam(fast.config, fast=False).eval()
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        arms = (("plain", plain, symmetric), ("copied", fast, padded_copy), ("fast", fast, symmetric))
        times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
        outs = {}
        with torch.inference_mode():
            for _ in range(args.repeats + 2):
                for name, m, conv in arms:
                    fast_efficientnet.conv_act = conv
                    t = time.perf_counter()
                    outs[name] = m.image_encoder(x)
                    times[name].append((time.perf_counter() - t) * 1000)
        fast_efficientnet.conv_act = symmetric
        a, c = (outs[k] if isinstance(outs[k], list) else [outs[k]] for k in ("plain", "fast"))
        diff = max(float((p - f).abs().max()) for p, f in zip(a, c))
        mp, mc, mf = (statistics.median(times[k][2:]) for k in ("plain", "copied", "fast"))
        print(f"| {size} | {mp:.1f} | {mc:.1f} | {mf:.1f} | {mp / mf:.2f}x | {mc / mf:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
