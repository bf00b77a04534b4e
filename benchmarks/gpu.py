"""The GPU path: image embeddings and prompts on a CUDA device, in fp32, bf16 (autocast) and compiled.

For vit_b (random weights in the official layout, also run by the reference ``segment_anything`` for the
fp32 side-by-side when it imports), vit_t (MobileSAM layout, reference ``mobile_sam``) and segany's default
model: the image embedding in each mode (``segany.perf.optimize``: fp32, bf16, fp32 + torch.compile,
bf16 + torch.compile), one prompt to full-size masks and 64 prompts in one batch (fp32 decoder), with the
IoU of each mode's masks against fp32's. Every step is guarded: a failure is recorded and the script
goes on. Writes ``gpu_results.json`` and ``gpu_results.md`` (the device named) to ``--out``.

    python benchmarks/gpu.py --out OUT_DIR [--repeats 10] [--models vit_b vit_t default] [--no-compile]
    python benchmarks/gpu.py --device cpu --quick --out /tmp/x    # a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    build_pair,
    fmt_time,
    install_embedding,
    interleaved,
    machine,
    masks_iou,
    median,
    preprocessed,
    reference_package,
    test_image,
)

import segany  # noqa: E402
from segany import perf  # noqa: E402
from segany.modeling import build_sam, get_config  # noqa: E402


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so that wall time covers the queued work."""

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return machine()["cpu"]


def make_model(name: str, tmp: Path, size: int | None):
    """(reference model or None, segany model, checkpoint path or None), on the CPU."""
    if name == "default":
        return None, segany.load_model("default"), None
    if size is None:  # full size: the reference is built too, with the same weights
        try:
            return build_pair(name, tmp)
        except Exception:  # noqa: BLE001 - the reference packages may be missing on the GPU machine
            traceback.print_exc()
    cfg = get_config(name)
    cfg.image_size = size or cfg.image_size
    path = tmp / f"{name}_{cfg.image_size}.safetensors"  # the modes reload these same random weights
    segany.save_model(build_sam(cfg).eval(), path)
    return None, segany.load_model(path), path


def bench(name: str, args: argparse.Namespace, device: torch.device, tmp: Path, log: list[dict]) -> None:
    size = 256 if args.quick and name != "default" else None
    ref, base, path = make_model(name, tmp, size)
    image = test_image(512 if args.quick else 1024)
    x = preprocessed(base, image).to(device)
    base = base.to(device)
    h, w = image.shape[:2]
    input_size = tuple(int(s * base.image_size / max(h, w)) for s in (h, w))

    def record(path_label: str, times: list[float], **extra) -> None:
        r = {"model": name, "path": path_label, "median_s": median(times), "n": len(times), **extra}
        log.append(r)
        more = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
        print(f"  {name} {path_label}: {fmt_time(r['median_s'])}{more}", flush=True)

    with torch.inference_mode():
        emb32 = base.image_encoder(x).float()
    fns = {}
    if ref is not None:
        ref = ref.to(device)

        def run_ref():
            with torch.no_grad():
                return ref.image_encoder(x)

        fns["reference fp32"] = synced(run_ref, device)
    modes = [("fp32", False), ("bf16", False)]
    if not args.no_compile:
        modes += [("fp32", True), ("bf16", True)]
    for precision, comp in modes:
        label = precision + (" + compile" if comp else "")
        try:
            if precision == "bf16" and not perf.bf16_supported(device):
                print(f"  {name} {label}: bf16 not supported on {device}, skipped")
                continue
            model = perf.optimize(_fresh(name, path).to(device), precision, compile=comp)
            t = time.perf_counter()

            def run(model=model):
                with torch.inference_mode():
                    return model.image_encoder(x)

            emb = synced(run, device)()
            first = time.perf_counter() - t
            fns[f"segany {label}"] = synced(run, device)
            quality = masks_iou(base, emb32, emb.float(), (h, w), input_size)
            log.append({"model": name, "path": f"embedding {label} (first call)", "median_s": first, "n": 1, **quality})
        except Exception as e:  # noqa: BLE001 - record and go on: the device time is precious
            traceback.print_exc()
            log.append({"model": name, "path": f"embedding {label}", "error": f"{type(e).__name__}: {e}"})
    times = interleaved(fns, args.repeats, warmup=2)
    for key, ts in times.items():
        record(f"embedding {key}", ts)

    pred = segany.SamPredictor(base)
    install_embedding(pred, emb32, (h, w), input_size)
    point = {"point_coords": np.array([[0.45 * w, 0.55 * h]]), "point_labels": np.array([1])}
    one = interleaved({"one": synced(lambda: pred.predict(**point), device)}, args.repeats * 3, warmup=3)["one"]
    record("one prompt -> 3 full-size masks (fp32)", one)
    pts = torch.as_tensor(np.random.default_rng(0).uniform(0.05, 0.95, (64, 1, 2)) * np.array([w, h]))
    coords = pred.transform.apply_coords_torch(pts.float(), (h, w)).to(device)
    labels = torch.ones(64, 1, dtype=torch.int, device=device)
    batch = synced(lambda: pred.predict_torch(coords, labels, multimask_output=True), device)
    record("64 prompts in one batch -> 192 full-size masks (fp32)", interleaved({"b": batch}, args.repeats)["b"])
    if ref is not None:
        rp = reference_package(name).SamPredictor(ref)
        install_embedding(rp, emb32, (h, w), input_size)

        def ref_one():
            with torch.no_grad():
                return rp.predict(**point)

        record(
            "reference: one prompt -> 3 full-size masks", interleaved({"r": synced(ref_one, device)}, args.repeats)["r"]
        )


def _fresh(name: str, path: Path | None) -> segany.Sam:
    """A new copy of the model with the same weights (modes change a model in place)."""
    return segany.load_model(path if path is not None else "default")


def write(out: Path, meta: dict, log: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps({"machine": meta, "rows": log}, indent=1))
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}", ""]
    lines += ["| model | path | median | notes |", "|---|---|---|---|"]
    for r in log:
        t = fmt_time(r["median_s"]) + f" (n={r['n']})" if "median_s" in r else "failed"
        notes = r.get("error", "")
        if "mask_iou_mean" in r:
            notes = f"mask IoU vs fp32: mean {r['mask_iou_mean']:.4f}, min {r['mask_iou_min']:.4f}"
        lines.append(f"| {r['model']} | {r['path']} | {t} | {notes} |")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_results.json / .md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_t", "default"], choices=["vit_b", "vit_t", "default"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes")
    ap.add_argument("--quick", action="store_true", help="256-pixel models, 2 repeats, no compile")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.no_compile = 2, True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    meta = machine() | {"device": str(device), "device_name": device_name(device)}
    print(f"{meta['device_name']}; torch {meta['torch']}", flush=True)
    log: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"\n=== {name} ===", flush=True)
            try:
                bench(name, args, device, Path(tmp), log)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                log.append({"model": name, "path": "(all)", "error": f"{type(e).__name__}: {e}"})
            write(Path(args.out), meta, log)  # after each model: a later failure keeps what was measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
