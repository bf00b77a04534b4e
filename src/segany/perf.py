"""Opt-in speed modes for the image encoder, with a measurable quality cost.

The default (fp32, eager) gives the official outputs (logits within 1e-4). These modes trade a little
accuracy or a start-up cost for speed; ``benchmarks/bench_encoder.py`` measures each one's speed and the
IoU of its masks against fp32:

* ``precision="bf16"``: the encoder under ``torch.autocast`` in bfloat16 (matmuls, convolutions and
  attention in bf16; norms, softmax statistics and the residual stream stay fp32); its output is
  returned as fp32, so the prompt side is unchanged. The weights of its linear and convolution layers
  are stored in bf16 (autocast would otherwise cast them again at every call). Only where the hardware
  has bf16 arithmetic (CPU: AVX512-BF16 or AMX; CUDA: compute capability 8.0+): elsewhere it would be
  emulated and slower.
* ``precision="int8"``: dynamic int8 quantisation of the encoder's ``nn.Linear`` layers (weights int8
  per tensor, activations quantised on the fly; CPU only). Changes the module's state dict: do not save
  a model in this mode.
* ``compile=True``: ``torch.compile`` of the encoder (inductor; on a CPU it needs a C++ compiler). The
  first call compiles (minutes for ViT-B), later calls with the same input size are fast.

``use_huge_pages()`` and ``reuse_freed_memory()`` are settings of the process, not of a model: large tensors
in transparent huge pages, and freed ones kept for reuse rather than handed back to the system.

ONNX Runtime is the other runtime: ``segany.export.onnx.export_encoder`` / ``export_decoder`` and
``segany.export.onnx_predictor.OnnxSamPredictor``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import warnings
from typing import Any, Literal

import torch
from torch import nn

from segany.errors import SegAnyError

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def compile_supported(device: torch.device | str = "cpu") -> bool:
    """True where ``torch.compile`` can build kernels: inductor needs a C++ compiler for CPU code."""
    if torch.device(device).type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    return True


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls run natively on ``device`` (not emulated)."""
    # imported here: importing the models makes tensors, and use_huge_pages must come before the first
    from segany.modeling.fast.common import bf16_supported as native

    return native(device)


def use_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator to back tensors of 2 MB and more with transparent huge pages (its
    ``THP_MEM_ALLOC_ENABLE``; a value the user set is kept). A large tensor is otherwise fresh memory from
    the system at every call (glibc maps allocations of a few MB and more anew and unmaps them when freed),
    touched in 4 KB pages, each a page fault (an image embedding's count and cost with and without this:
    benchmarks/README.md, "Later clicks ..., and huge pages"). The segany command calls
    it first; in a program of your own, call it before any tensor is made: PyTorch reads the setting once,
    at its first allocation. The kernel must allow the pages (``transparent_hugepage`` "always" or
    "madvise", the default of most Linux systems); elsewhere nothing changes.

    Returns:
        whether the allocator now aligns large tensors to pages, the mark of this mode.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    probe = torch.empty(1 << 20)  # 4 MB
    return probe.data_ptr() % 4096 == 0


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(largest_mb: int = 64, keep_mb: int = 1024) -> bool:
    """Ask glibc's malloc to serve blocks of up to ``largest_mb`` MB from its heap and to keep up to
    ``keep_mb`` MB of freed heap for reuse (``mallopt``'s M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), rather
    than map each large block anew and hand it back when freed. An image's embedding allocates and frees
    the same large maps at every call: mapped anew they are faulted in again each time, even as huge pages
    (the kernel zeroes every page it hands out); kept, they are reused as they are (figures in
    benchmarks/README.md, "Freed memory kept for reuse"). The process's resident memory then stays near
    its peak between calls instead of falling. The segany command calls it first; Linux with glibc only
    (elsewhere nothing changes).

    Returns:
        whether both settings took.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, largest_mb << 20) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, keep_mb << 20) == 1 and mmap_ok)


def _autocast_forward(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Make ``module`` run under ``torch.autocast(dtype)`` and return fp32, keeping its state dict keys
    (a wrapper module would rename them); ``dtype=None``: autocast off and fp32 inputs (an fp32 part
    inside an autocast encoder)."""
    inner = module.forward
    device_type = next(module.parameters()).device.type

    def forward(*args, **kwargs) -> Any:
        if dtype is None:
            args = tuple(a.float() if torch.is_tensor(a) else a for a in args)
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = inner(*args, **kwargs)
        # an encoder with high-resolution features returns [stride 4, stride 8, embedding]
        return [t.float() for t in out] if isinstance(out, (list, tuple)) else out.float()

    module.forward = forward  # type: ignore[method-assign]


def optimize(model: nn.Module, precision: Precision = "fp32", compile: bool | str = False) -> nn.Module:
    """Switch ``model``'s image encoder (a :class:`~segany.modeling.sam.Sam`) to a speed mode, in place.

    Args:
        precision: "fp32" (default: unchanged), "bf16" or "int8" (see the module docstring).
        compile: ``torch.compile`` the encoder (True: inductor; a string: that backend, e.g. "eager").
    Returns:
        ``model`` (in eval mode), for chaining. A mode is set once: build or load a fresh model for another.
    Raises:
        SegAnyError: an unknown precision, or one the device does not support.
    """
    if precision not in PRECISIONS:
        raise SegAnyError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if getattr(model, "speed_mode", None) not in (None, ("fp32", False)):
        raise SegAnyError(f"the model is already in speed mode {model.speed_mode}; load a fresh one")
    model.eval()
    enc = model.image_encoder
    device = next(enc.parameters()).device
    if precision == "bf16":
        if not bf16_supported(device):
            raise SegAnyError(f"bf16 is not supported natively on {device} (it would be slower than fp32)")
        # an encoder may name parts that bf16 would change too much (EfficientNet's first layers)
        sensitive = getattr(enc, "bf16_sensitive_modules", tuple)()
        keep = {id(m) for part in sensitive for m in part.modules()}
        for m in enc.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in keep:
                m.to(torch.bfloat16)
        for part in sensitive:
            _autocast_forward(part, None)
        _autocast_forward(enc, torch.bfloat16)
    elif precision == "int8":
        if device.type != "cpu":
            raise SegAnyError("int8 dynamic quantisation runs on the CPU only")
        quantize = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
        if quantize is None:
            raise SegAnyError(f"int8 needs torch.ao.quantization.quantize_dynamic (not in torch {torch.__version__})")
        if not any(isinstance(m, nn.Linear) for m in enc.modules()):
            raise SegAnyError(f"int8 quantises the image encoder's linear layers; {type(enc).__name__} has none")
        with warnings.catch_warnings():  # torch.ao's deprecation notices (it still works in torch 2.13)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            quantize(enc, {nn.Linear}, dtype=torch.qint8, inplace=True)
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        if backend == "inductor" and not compile_supported(device):
            raise SegAnyError("torch.compile on the CPU needs a C++ compiler (g++ or clang++) on the PATH")
        enc.compile(backend=backend)
    model.speed_mode = (precision, compile)
    return model
