"""``segany export-onnx``: the decoder (official SAM ONNX interface) and optionally the image encoder."""

from __future__ import annotations

import argparse
import os
import time

from segany.errors import SegAnyError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, metavar="DECODER.onnx", help="the prompt encoder + mask decoder")
    p.add_argument("--encoder", metavar="ENCODER.onnx", help="also export the image encoder here")
    p.add_argument("--model", default="default", help="model name (see `segany models`) or checkpoint path")
    p.add_argument(
        "--return-single-mask", action="store_true",
        help="one mask per call (the official rule picks it) instead of all 4 outputs",
    )
    p.add_argument("--use-stability-score", action="store_true", help="replace the IoU predictions by stability")
    p.add_argument("--hq-token-only", action="store_true", help="SAM-HQ: the HQ token's mask alone (upstream's option)")
    p.add_argument("--first-prompt-only", action="store_true", help="leave a model's correction decoder out: the first "
                   "decoder answers every prompt; half the graph where no mask input is sent (the web page's)")
    p.add_argument("--quantize", action="store_true", help="dynamic int8 weights (onnxruntime), about 4x smaller")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")


def run(args: argparse.Namespace) -> int:
    from segany.checkpoint import load_model
    from segany.export.onnx import export_decoder, export_encoder

    if args.opset < 17:
        raise SegAnyError(f"--opset {args.opset}: 17 or newer is needed (LayerNormalization)")
    t0 = time.perf_counter()
    model = load_model(args.model)
    export_decoder(
        model, args.out, return_single_mask=args.return_single_mask,
        use_stability_score=args.use_stability_score, opset=args.opset, quantize=args.quantize,
        hq_token_only=args.hq_token_only, first_prompt_only=args.first_prompt_only,
    )
    print(f"decoder -> {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    if args.encoder:
        export_encoder(model, args.encoder, opset=args.opset, quantize=args.quantize)
        print(f"encoder -> {args.encoder} ({os.path.getsize(args.encoder) / 1e6:.2f} MB)")
    print(f"exported {args.model} in {time.perf_counter() - t0:.1f} s")
    if getattr(model, "point_refiner", None) is not None:
        print("note: the model's point refiner is not in the graph: its masks are the decoder's, upsampled (as "
              "the web page's hover preview; SamPredictor and the server refine them at the image's resolution)")
    return 0
