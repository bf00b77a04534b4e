"""Speed of the default model on this CPU: image embedding, one prompt to a full-size mask, "everything".

    python benchmarks/default_speed.py [--model default] [--size 1024] [--repeats 20] [--threads 1] [--onnx]

Prints medians (ms) beside issue 17's targets (one thread: embedding <= 300 ms for a 1024-pixel image,
one prompt to one full-size mask <= 15 ms, ``segany everything`` <= 10 s). The test image is
examples/cat.jpg resized to ``--size`` on its longest side. The embedding time includes the resize to the
model's input size and normalisation (what ``SamPredictor.set_image`` does); the prompt time is one
``predict`` call with one point and ``multimask_output=False``, returning the binary mask at the original
image size; "everything" is one ``SamAutomaticMaskGenerator.generate`` at the official defaults. Zoom-in's
costs (``segany.zoom_in``, the web tool's default) are printed beside them, and a later click (the previous
mask as input: the click protocol's clicks after the first) beside the same click through the plain modules.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-everything", action="store_true", help="skip the automatic mask generator")
    ap.add_argument("--onnx", action="store_true", help="also the exported decoders in ONNX Runtime: the "
                    "web page's on a first click, the whole one on a first and a later click")
    ap.add_argument("--no-huge-pages", action="store_true", help="large tensors in 4 KB pages (the segany "
                    "command asks for huge pages: segany.perf.use_huge_pages)")
    ap.add_argument("--no-memory-reuse", action="store_true", help="freed large tensors handed back to the "
                    "system (the segany command keeps them: segany.perf.reuse_freed_memory)")
    args = ap.parse_args()
    from segany.perf import reuse_freed_memory, use_huge_pages

    huge = False if args.no_huge_pages else use_huge_pages()  # as the segany command, before any tensor
    reuse = False if args.no_memory_reuse else reuse_freed_memory()
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)  # the post-processing's resizes (segany.modeling.fast.postprocess)

    from segany import SamAutomaticMaskGenerator, SamPredictor, load_model
    from segany.io.images import load_image

    model = load_model(args.model)
    cat = load_image(str(Path(__file__).resolve().parents[1] / "examples" / "cat.jpg"))
    scale = args.size / max(cat.shape[:2])
    image = cv2.resize(cat, (round(cat.shape[1] * scale), round(cat.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
    h, w = image.shape[:2]
    pred = SamPredictor(model)
    before = resource.getrusage(resource.RUSAGE_SELF)
    emb = median_ms(lambda: pred.set_image(image), args.repeats)
    after = resource.getrusage(resource.RUSAGE_SELF)
    calls = args.repeats + 2  # median_ms's warm-up calls too
    # The kernel's share (page faults of fresh memory, which huge pages cut): steadier than wall times here.
    sys_ms = (after.ru_stime - before.ru_stime) / calls * 1000
    faults = (after.ru_minflt - before.ru_minflt) / calls
    grid = pred.model.image_size  # the model's input size, or larger for a larger image (max_image_size)
    pt, lab = np.array([[w / 2, h / 2]]), np.array([1])
    one = median_ms(lambda: pred.predict(pt, lab, multimask_output=False), args.repeats * 5)
    multi = median_ms(lambda: pred.predict(pt, lab, multimask_output=True), args.repeats * 5)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    threads = torch.get_num_threads()
    print(f"model {args.model}: {params:.2f} M parameters, input {model.image_size} px, torch threads {threads}, "
          f"huge pages {'on' if huge else 'off'}, freed memory reused {'on' if reuse else 'off'}")
    print(f"image {w}x{h} (encoded at {grid} px): embedding median {emb:.1f} ms (target <= 300 ms at 1024 px; "
          f"system time {sys_ms:.1f} ms and {faults:,.0f} page faults a call)")
    print(f"one point -> full-size mask: median {one:.2f} ms (single; target <= 15 ms), {multi:.2f} ms (3 masks)")
    # A later click: two points and the first click's mask as the mask input, one mask (the click protocol's
    # clicks after the first). A mask input changes every cell of the dense embedding, so these skip the
    # re-associated decoder; the same click through the plain modules (same weights: the prompt encoder, the
    # decoder and the post-processing without their fast paths) is timed beside them, interleaved.
    from _common import interleaved

    from segany.modeling import build_sam
    from segany.modeling.sam import model_weights

    low = pred.predict(pt, lab, multimask_output=False)[2]
    two, two_lab = np.array([[w / 2, h / 2], [w / 4, h / 4]]), np.array([1, 0])
    plain_model = build_sam(model.config, fast=False).eval()
    plain_model.load_state_dict(model_weights(model))
    plain = SamPredictor(plain_model)
    plain.set_image(image)
    times = interleaved(
        {name: lambda p=p: p.predict(two, two_lab, mask_input=low, multimask_output=False)
         for name, p in {"fast": pred, "plain": plain}.items()},
        args.repeats * 5,
        warmup=2,
    )
    fast_ms, plain_ms = (statistics.median(times[name]) * 1000 for name in ("fast", "plain"))
    print(f"a later click (2 points + the previous mask) -> full-size mask: median {fast_ms:.2f} ms "
          f"(the plain modules, interleaved: {plain_ms:.2f} ms, {plain_ms / fast_ms:.2f}x)")
    # Zoom-in (segany.zoom_in; the web tool's default): a first click refined on a crop costs an embedding
    # of the crop; a later click whose crop is kept, a decoder call on it.
    from segany.zoom_in import ZoomInPredictor

    zoom = ZoomInPredictor(SamPredictor(model))
    whole = (pred.get_image_embedding(), pred.original_size, image, pred.input_size, pred.get_decoder_inputs())

    def first() -> np.ndarray:
        zoom.set_embedding(*whole)  # as after set_image (not timed again): the crop is embedded every time
        return zoom.predict(pt, lab, multimask_output=True)[2]

    refined = median_ms(first, args.repeats)
    low = first()
    crop = zoom.last_crop
    later_pt = np.array([[w / 2, h / 2], [(crop[0] + w / 2) / 2, (crop[1] + h / 2) / 2]])  # inside the crop
    later = median_ms(lambda: zoom.predict(later_pt, np.array([1, 0]), mask_input=low, multimask_output=False),
                      args.repeats * 5)
    half = np.ascontiguousarray(image[: h // 2, : w // 2])
    moved = median_ms(lambda: pred.set_image(half), args.repeats)
    print(f"zoom-in: first click refined on a {crop[2] - crop[0]}x{crop[3] - crop[1]} crop {refined:.1f} ms, "
          f"a later click on the kept crop {later:.2f} ms (crop kept: {zoom.last_crop == crop}), a click that "
          f"moves the crop + one embedding of it ({w // 2}x{h // 2}: {moved:.1f} ms)")
    if args.onnx:
        onnx_clicks(model, image, (pt, lab), (two, two_lab), args)
    if not args.no_everything:
        generator = SamAutomaticMaskGenerator(model)
        t = time.perf_counter()
        records = generator.generate(image)
        print(f"everything: {time.perf_counter() - t:.2f} s, {len(records)} masks (target <= 10 s at 1024 px)")


def onnx_clicks(model, image: np.ndarray, first: tuple, later: tuple, args: argparse.Namespace) -> None:
    """The exported decoders at the model's input size in ONNX Runtime on this CPU: the page's (``segany
    serve`` exports it with ``first_prompt_only``: a correction decoder left out) on a first click, and the
    whole one (``segany export-onnx``) on a first click and a later click (the previous mask as input)."""
    import tempfile

    from segany.export.onnx import export_decoder, export_encoder
    from segany.export.onnx_predictor import OnnxSamPredictor

    with tempfile.TemporaryDirectory() as tmp:
        enc = export_encoder(model, Path(tmp) / "e.onnx")
        for name, first_only in (("the page's decoder", True), ("the whole decoder", False)):
            dec = export_decoder(model, Path(tmp) / f"d{int(first_only)}.onnx", first_prompt_only=first_only)
            pred = OnnxSamPredictor(enc, dec, threads=args.threads)
            pred.set_image(image)
            low = pred.predict(*first, multimask_output=False)[2]
            times = [f"a first click {_click_ms(pred, first, None, args.repeats * 5):.2f} ms"]
            if not first_only:
                times.append(f"a later click {_click_ms(pred, later, low, args.repeats * 5):.2f} ms")
            print(f"{name} (ONNX Runtime, {dec.stat().st_size / 1e6:.1f} MB): " + ", ".join(times))


def _click_ms(pred, prompt: tuple, mask_input, repeats: int) -> float:
    """Median ms of one ``predict`` of ``prompt`` (points, labels) with ``mask_input``, one mask."""
    return median_ms(lambda: pred.predict(*prompt, mask_input=mask_input, multimask_output=False), repeats)


if __name__ == "__main__":
    main()
