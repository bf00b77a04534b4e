"""When the fast paths run, and the small in-place helpers they share."""

from __future__ import annotations

import torch
from torch import nn


def active(module: nn.Module | None = None) -> bool:
    """True where the inference-only fast paths (in-place updates, ``out=`` buffers, caches, folded batch
    norms, worker threads) may run: no autograd, ``module`` in eval mode, and not being traced, compiled or
    exported (those see the plain code, which their own optimisations and exporters handle better)."""
    return (
        not torch.is_grad_enabled()
        and not (module is not None and module.training)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def weights_key(*tensors: torch.Tensor) -> tuple:
    """A cache key for values computed from ``tensors`` (weights): it changes when one is replaced (another
    storage, device or dtype) or written in place (its version counter; inference tensors have none and are
    never written), and between inference mode and outside it (tensors made in it cannot be used outside)."""
    key: tuple = (torch.is_inference_mode_enabled(),)
    for t in tensors:
        key += (t.data_ptr(), t.device, t.dtype, None if t.is_inference() else t._version)
    return key


def layer_tensors(*layers: nn.Module) -> list[torch.Tensor]:
    """The ``weight`` and ``bias`` of each of ``layers`` that has them, read directly (for :func:`weights_key` on a
    hot path: walking ``Module.parameters()`` cost more than the rest of a cache hit)."""
    found = (getattr(layer, name, None) for layer in layers for name in ("weight", "bias"))
    return [t for t in found if isinstance(t, torch.Tensor)]


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls run natively on ``device`` (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def activate_(x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(x)``, in place in ``x`` for GELU and ReLU when autograd is off (``x`` must be the caller's own
    fresh tensor): saves an allocation and a pass over memory per activation."""
    if torch.is_grad_enabled():
        return act(x)
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is nn.ReLU:
        return torch.relu_(x)
    return act(x)


def mlp_inplace(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An ``MLPBlock``'s ``lin2(act(lin1(x)))`` with the activation in place (the hidden activations are
    ours)."""
    return mlp.lin2(activate_(mlp.lin1(x), mlp.act))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    """``act(x @ weight + bias)`` (``weight``: in x out; ``act`` None: none) for inference; on a CPU in
    fp32 the bias and a GELU are fused into the product (oneDNN post-ops: one pass over the output
    instead of two or three, which matters where memory bandwidth is the limit)."""
    fused = act is None or (type(act) is nn.GELU and act.approximate == "none")
    if (
        fused
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == bias.dtype == torch.float32
        and _HAS_FUSED_LINEAR
        and not torch.is_grad_enabled()
    ):
        attr, algorithm = ("none", "") if act is None else ("gelu", "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight.t().contiguous(), bias, attr, [], algorithm)
    y = torch.addmm(bias, x, weight)
    return y if act is None else activate_(y, act)


_HAS_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
