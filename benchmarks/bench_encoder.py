"""Image embedding, side by side: segany and the reference, same weights, same process, same threads.

For each model: the reference encoder (``segment_anything`` for vit_b, ``mobile_sam`` for vit_t; none for
segany's default model) and segany's, in the default fp32 mode and in each opt-in mode (bf16, int8,
torch.compile, ONNX Runtime), all timed round-robin on the same preprocessed image (``examples/cat.jpg``
at 1024). Prints medians, the speed-up over the reference, the largest embedding difference from the
reference (fp32) and, for the opt-in modes, the IoU of the masks that the fp32 decoder gives from their
embedding against those from the fp32 embedding (16 points and 3 boxes, 3 masks each).

Then the machine's limit: the encoder's FLOPs (torch.utils.flop_counter, counted on the reference model
where there is one) over the measured time, against the best of a large fp32 (and bf16) matmul on the
same threads.

    python benchmarks/bench_encoder.py [--models vit_b vit_t default] [--modes bf16 int8 compile ort]
        [--repeats 3] [--threads 2] [--quick] [--json results.jsonl]

``--quick``: vit_b at 256 pixels, one repeat, no compile: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    build_pair,
    count_flops,
    interleaved,
    masks_iou,
    matmul_peak,
    median,
    preprocessed,
    print_machine,
    row,
    save_results,
    set_threads,
    test_image,
)

import segany  # noqa: E402
from segany import perf  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402

MODES = ("bf16", "int8", "compile", "ort")


def load_ours(path: Path | None) -> segany.Sam:
    return segany.load_model(path if path is not None else "default")


def mode_runner(mode: str, path: Path | None, x: torch.Tensor, tmp: Path, threads: int):
    """A function computing the embedding of ``x`` in ``mode``, or None where the machine lacks it."""
    if mode == "ort":
        from segany.export.onnx import export_encoder
        from segany.export.onnx_predictor import _session

        onnx_path = export_encoder(load_ours(path), tmp / "encoder.onnx")
        sess, feed = _session(onnx_path, threads), {"image": x.numpy()}
        return lambda: torch.from_numpy(sess.run(None, feed)[0])
    precision = mode if mode in perf.PRECISIONS else "fp32"
    if precision == "bf16" and not perf.bf16_supported("cpu"):
        return None
    if mode == "compile" and not perf.compile_supported("cpu"):
        return None
    model = perf.optimize(load_ours(path), precision, compile=mode == "compile")

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.image_encoder(x)

    return run


def bench_model(name: str, args: argparse.Namespace, tmp: Path, peak32: float, peak16: float) -> list[dict]:
    print(f"\n=== {name} ===", flush=True)
    image = test_image(1024)
    ref = path = None
    if name == "default":
        ours = load_ours(None)
    else:
        size = 256 if args.quick and name == "vit_b" else 1024
        ref, ours, path = build_pair(name, tmp, image_size=size)
    x = preprocessed(ours, image)
    fns = {}
    if ref is not None:

        def run_ref() -> torch.Tensor:
            with torch.no_grad():  # as the official SamPredictor.set_torch_image
                return ref.image_encoder(x)

        fns["reference"] = run_ref

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return ours.image_encoder(x)

    fns["segany fp32"] = run_ours
    first_call = {}
    for mode in args.modes:
        t = time.perf_counter()
        try:
            fn = mode_runner(mode, path, x, tmp, args.threads)
        except SegAnyError as e:  # a mode this model has no use for (int8 of a convolutional encoder)
            print(f"  {mode}: {e}, skipped")
            continue
        if fn is None:
            print(f"  {mode}: not supported on this machine, skipped")
            continue
        fn()  # compiles / warms up
        first_call[mode] = time.perf_counter() - t
        fns[f"segany {mode}"] = fn
    times = interleaved(fns, args.repeats, warmup=0 if args.quick else 1)

    base = run_ours()
    emb_ref = fns["reference"]() if ref is not None else None
    t_ref = times.get("reference")
    counted = ref.image_encoder if ref is not None else ours.image_encoder
    flops = count_flops(counted, x)
    rows = []
    extra = {"gflop": flops / 1e9, "fraction_of_fp32_peak": flops / median(times["segany fp32"]) / 1e9 / peak32}
    if t_ref:
        extra["reference_fraction_of_fp32_peak"] = flops / median(t_ref) / 1e9 / peak32
        extra["max_abs_diff_vs_reference"] = float((base - emb_ref).abs().max())
    rows.append(row(f"{name} embedding fp32", t_ref, times["segany fp32"], **extra))
    input_size = tuple(int(s * ours.image_size / max(image.shape[:2])) for s in image.shape[:2])
    for mode in args.modes:
        if f"segany {mode}" not in fns:
            continue
        emb = fns[f"segany {mode}"]()
        quality = masks_iou(ours, base, emb, image.shape[:2], input_size)
        extra = {"first_call_s": first_call[mode], **quality}
        extra["fraction_of_fp32_peak"] = flops / median(times[f"segany {mode}"]) / 1e9 / peak32
        if mode == "bf16":
            extra["fraction_of_bf16_peak"] = flops / median(times[f"segany {mode}"]) / 1e9 / peak16
        rows.append(row(f"{name} embedding {mode}", t_ref, times[f"segany {mode}"], **extra))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_t", "default"], choices=["vit_b", "vit_t", "default"])
    ap.add_argument("--modes", nargs="*", default=None, choices=MODES, help="opt-in modes (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    ap.add_argument("--json", help="append the results to this JSON-lines file")
    args = ap.parse_args()
    if args.modes is None:
        args.modes = [m for m in MODES if not (args.quick and m == "compile")]
    if args.quick:
        args.repeats = 1
    args.threads = set_threads(args.threads)
    meta = print_machine()
    peak32 = matmul_peak(torch.float32, 1024 if args.quick else 4096)
    peak16 = matmul_peak(torch.bfloat16, 1024 if args.quick else 4096) if perf.bf16_supported() else float("nan")
    print(f"matmul peak (best of 5, {args.threads} threads): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    meta |= {"fp32_peak_gflops": peak32, "bf16_peak_gflops": peak16}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp), peak32, peak16)
    save_results(args.json, "encoder", meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
