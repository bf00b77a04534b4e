"""EfficientNet-Lite's inference path: the same function as
:class:`~segany.modeling.efficientnet.EfficientNetLiteEncoder`, with less memory traffic.

The trunk's activations are large (96 channels at half the input's side), and at 640 pixels and more the
plain layers spent more time passing over them than computing: a separate ReLU6 pass after each
convolution, and PyTorch's reference kernel for depth-wise convolutions in the default layout. Here the
weights and activations are channels-last, each convolution and its ReLU6 are one oneDNN call (a fused
post-op), and the residual sums are in place (benchmarks/README.md has the timings). Where that call
does not apply (another dtype, under autocast: the bf16 speed mode, whose fp32 first layers wrap the
modules) the layers' own forwards run, so what wraps them still holds. The maps it returns are
contiguous, as the plain encoder's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.efficientnet import HIGH_RES_STAGES, ConvAct, EfficientNetLiteEncoder, MBConv
from segany.modeling.fast.common import active

_HAS_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_act(m: ConvAct, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``: convolution and ReLU6 as one oneDNN call where it applies, else the layer's forward."""
    if not (
        _HAS_FUSED_CONV
        and x.device.type == "cpu"
        and x.dtype == m.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):
        return m(x)
    attr, scalars = ("hardtanh", [0.0, 6.0]) if m.act else ("none", [])
    weight, padding = m.weight, list(m.padding)
    if m.stride[0] == 2 and m.kernel_size[0] % 2 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
        weight, padding = _same_as_symmetric(m.weight)
    else:
        x = m.pad_same(x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, m.bias, padding, list(m.stride), list(m.dilation), m.groups, attr, scalars, ""
    )


def _same_as_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A stride-2 ``k x k`` convolution (``k`` odd) with TensorFlow's "SAME" padding of an even-sized input
    (``(k - 3) / 2`` before, one more after) as a ``(k + 1) x (k + 1)`` one whose first row and column of
    taps are zero, with ``(k - 1) / 2`` on both sides: the same windows and sums, without copying the
    input into a padded tensor, which cost the encoder a fifth of its time on its largest maps."""
    k = weight.shape[-1]
    return F.pad(weight, (1, 0, 1, 0)).contiguous(memory_format=torch.channels_last), [(k - 1) // 2] * 2


def mbconv(m: MBConv, x: torch.Tensor) -> torch.Tensor:
    y = x if isinstance(m.expand, nn.Identity) else conv_act(m.expand, x)
    y = conv_act(m.project, conv_act(m.depthwise, y))
    return y.add_(x) if m.residual else y  # y is this block's own fresh output


class FastEfficientNetLite(EfficientNetLiteEncoder):
    """:class:`EfficientNetLiteEncoder` with the fused channels-last trunk above at inference (same weights,
    same function); the plain forward everywhere else. Its convolution weights are stored channels-last
    (loading a state dict keeps that layout; saving makes them contiguous), so oneDNN does not reorder
    them at every call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not active(self):
            return super().forward(x)
        x = conv_act(self.stem, x.contiguous(memory_format=torch.channels_last))
        feats, high = [], []
        for i, stage in enumerate(self.stages):
            x = _stage(stage, x)
            if i in self.pyramid:
                feats.append(x)
            if self.high_res and i in HIGH_RES_STAGES:
                high.append(x.contiguous())
        emb = self.merge(feats).contiguous()
        return [*high, emb] if self.high_res else emb


def _stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A trunk stage block by block, or through its own forward where something wraps it (the bf16 speed
    mode keeps the first stages in fp32 by wrapping their forward)."""
    if "forward" in vars(stage):
        return stage(x)
    for block in stage:
        x = mbconv(block, x)
    return x
