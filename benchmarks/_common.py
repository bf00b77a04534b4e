"""Shared by the side-by-side benchmarks: machine description, threads, interleaved timing, the same
random weights loaded into segany and the reference, mask IoU, FLOP counts and the matmul peak.

Timing on a shared machine: the implementations are timed round-robin (A, B, A, B, ...), so that a change
in the machine's load shows up on both sides rather than on one, and medians are reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import segany  # noqa: E402
from tests.reference import (  # noqa: E402
    build_reference_tiny_vit,
    build_reference_vit,
    import_mobile_sam,
    import_reference,
    save_official_checkpoint,
)

# -- the machine ---------------------------------------------------------------------------------------


def set_threads(n: int) -> int:
    """Torch's intra-op threads and OpenCV's (the fast post-processing's resizes) (0: leave the defaults);
    returns torch's count in use."""
    if n:
        torch.set_num_threads(n)
        cv2.setNumThreads(n)
    return torch.get_num_threads()


def cpu_name() -> str:
    """The CPU model and the vector extensions that matter here."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in flags]
    return f"{name} ({', '.join(ext)})" if ext else name


def machine() -> dict[str, Any]:
    """What the numbers were measured on; printed first by every benchmark and stored with its results."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1m": round(load[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def print_machine() -> dict[str, Any]:
    m = machine()
    print(
        f"{m['cpu']}; {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
        f"load average {m['load_average_1m']} at start; {m['date']}",
        flush=True,
    )
    return m


# -- timing ---------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call: ``warmup`` untimed rounds, then ``repeats`` rounds, one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def row(path: str, ref: list[float] | None, ours: list[float], **extra: Any) -> dict[str, Any]:
    """A result: medians of both sides, their ratio (reference / segany) and extra fields; printed."""
    r: dict[str, Any] = {"path": path, "segany_s": median(ours), "n": len(ours)}
    if ref:
        r |= {"reference_s": median(ref), "speedup": median(ref) / median(ours), "n_ref": len(ref)}
    r |= extra
    side = f"reference {fmt_time(r['reference_s'])}, " if ref else ""
    ratio = f" -> {r['speedup']:.2f}x" if ref else ""
    more = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
    print(f"  {path}: {side}segany {fmt_time(r['segany_s'])}{ratio}{more}", flush=True)
    return r


def save_results(path: str | None, name: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Append ``{"benchmark", "machine", "rows"}`` as one JSON line to ``path`` (run_all.py collects them)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"benchmark": name, "machine": meta, "rows": rows}) + "\n")


# -- models and inputs ----------------------------------------------------------------------------------


# Decoder calibration of tests/test_amg.py: ViT-B's decoder mixes 32 channels, sparsity keeps masks varied.
SPARSITY = 0.2


def build_pair(
    kind: str, tmp: Path, image: np.ndarray | None = None, image_size: int = 1024, seed: int = 0
) -> tuple[Any, segany.Sam, Path]:
    """(reference model, segany model loaded from its official checkpoint, checkpoint path).

    ``vit_b``: the official ``segment_anything`` ViT-B; ``vit_t``: MobileSAM's TinyViT (1024 only); random
    weights in the official layout, loaded by ``segany.load_model`` with no model type. With ``image``,
    the random mask decoder is first edited so that its masks are blobs in that image rather than
    checkerboards (``tests/test_amg.py::make_masks_visible``), which makes mask IoUs meaningful.
    """
    from tests.test_amg import make_masks_visible

    if kind == "vit_b":
        ref = build_reference_vit(seed=seed, image_size=image_size)
        name = "sam_vit_b_random.pth"
    elif kind == "vit_t":
        ref = build_reference_tiny_vit(seed=seed)
        name = "mobile_sam_random.pt"
    else:
        raise ValueError(f"no reference for {kind!r}")
    if image is not None:
        with torch.no_grad():
            make_masks_visible(ref, reference_package(kind).SamPredictor, image, sparsity=SPARSITY)
    path = save_official_checkpoint(ref, tmp / name)
    return ref, segany.load_model(path), path


def reference_package(kind: str):
    return import_reference() if kind == "vit_b" else import_mobile_sam()


def test_image(long_side: int = 1024) -> np.ndarray:
    """``examples/cat.jpg`` resized so that its long side is ``long_side`` pixels (a 3:2 photo)."""
    from PIL import Image

    img = Image.open(ROOT / "examples" / "cat.jpg").convert("RGB")
    scale = long_side / max(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    return np.asarray(img.resize(size, Image.BICUBIC), dtype=np.uint8).copy()


def preprocessed(model: segany.Sam, image: np.ndarray) -> torch.Tensor:
    """The ``1 x 3 x S x S`` encoder input of ``image`` (resized, normalized, padded: ``set_image``'s)."""
    from segany.transforms import ResizeLongestSide

    resized = ResizeLongestSide(model.image_size).apply_image(image)
    return model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())


def prompt_set(h: int, w: int) -> list[dict[str, Any]]:
    """``predict`` keyword arguments: a 4 x 4 grid of single points and 3 boxes (multimask outputs)."""
    out: list[dict[str, Any]] = []
    for fy in (0.2, 0.4, 0.6, 0.8):
        for fx in (0.2, 0.4, 0.6, 0.8):
            out.append({"point_coords": np.array([[fx * w, fy * h]]), "point_labels": np.array([1])})
    for x0, y0, x1, y1 in ((0.1, 0.1, 0.6, 0.6), (0.3, 0.2, 0.9, 0.9), (0.05, 0.4, 0.5, 0.95)):
        out.append({"box": np.array([x0 * w, y0 * h, x1 * w, y1 * h])})
    return out


def masks_iou(model: segany.Sam, emb_a: torch.Tensor, emb_b: torch.Tensor, original_size, input_size) -> dict:
    """Mean and smallest IoU between the masks that ``model``'s (fp32) decoder gives for the prompts of
    :func:`prompt_set` on two embeddings of the same image: how much an encoder mode changes the masks."""
    pred = segany.SamPredictor(model)
    ious = []
    for kw in prompt_set(*original_size):
        got = []
        for emb in (emb_a, emb_b):
            install_embedding(pred, emb.float(), original_size, input_size)
            got.append(pred.predict(**kw)[0])
        ious += [mask_iou(a, b) for a, b in zip(*got)]
    return {"mask_iou_mean": float(np.mean(ious)), "mask_iou_min": float(np.min(ious))}


def install_embedding(predictor: Any, embedding: torch.Tensor, original_size, input_size) -> None:
    """Give either package's ``SamPredictor`` a precomputed embedding (as ``set_image`` would leave it)."""
    predictor.reset_image()
    predictor.original_size = tuple(original_size)
    predictor.input_size = tuple(input_size)
    predictor.features = embedding
    predictor.is_image_set = True


def mask_iou(a: Any, b: Any) -> float:
    """IoU of two boolean masks (arrays or tensors of the same shape); 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# -- FLOPs and the machine's limit ----------------------------------------------------------------------


def count_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``module(x)`` (torch.utils.flop_counter: matmuls and convolutions, 2 per multiply-add).

    Attention runs through SDPA's math backend while counting: the counter has no formula for the CPU's
    fused kernels, and the math backend spells the same products as matmuls.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul on the current threads: the best of ``repeats`` (the machine's
    limit, so the best run, not the median)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(interleaved({"mm": lambda: a @ b}, repeats, warmup=0)["mm"])
    return 2 * n**3 / best / 1e9
