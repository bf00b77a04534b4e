"""TinyViT's inference path: the same function as :class:`~segany.modeling.tiny_vit.TinyViT`, with less
memory traffic.

Each batch norm is folded into its convolution (one pass over the output, not two), the convolutions run
channels-last (the layout the attention stages use anyway, so the hand-overs between them are views),
activations are applied in place, and the window attention and the MLPs of the large stages run in
pieces on one-core worker threads (robust on a busy machine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segany.modeling.fast.common import activate_, active
from segany.modeling.fast.workers import available_workers, map_on_workers
from segany.modeling.tiny_vit import (
    Attention,
    BasicLayer,
    Conv2dBN,
    ConvLayer,
    MBConv,
    Mlp,
    PatchMerging,
    TinyViT,
    TinyViTBlock,
    window_attention,
)

# Tokens that go through an MLP at once (one piece of work for a worker thread).
MLP_CHUNK_TOKENS = 2048
# Stages with fewer activations than this stay in the calling thread: handing small work to worker
# threads cost more than it saved.
WORKER_MIN_ELEMENTS = 1 << 20


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)  # in place: the first stage's activations are 64 MB each at 1024 pixels


def conv_bn(m: Conv2dBN, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` with the batch norm folded into the convolution."""
    c, bn = m.c, m.bn
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = c.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(x, weight, bn.bias - bn.running_mean * scale, c.stride, c.padding, c.dilation, c.groups)


def mbconv(m: MBConv, x: torch.Tensor) -> torch.Tensor:
    y = _gelu_(conv_bn(m.conv2, _gelu_(conv_bn(m.conv1, x))))
    return _gelu_(conv_bn(m.conv3, y).add_(x))


def patch_merging(m: PatchMerging, x: torch.Tensor) -> torch.Tensor:
    return conv_bn(m.conv3, _gelu_(conv_bn(m.conv2, _gelu_(conv_bn(m.conv1, x)))))


def mlp(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    return m.fc2(activate_(m.fc1(m.norm(x)), m.act))  # the hidden activations are ours


def attend_windows(attn: Attention, windows: torch.Tensor) -> torch.Tensor:
    """``attn(windows)`` (``nW x ws*ws x C``); many windows in groups on one-core workers (windows are
    independent)."""
    big = windows.numel() >= WORKER_MIN_ELEMENTS
    pieces = 2 * available_workers(windows.device) if big else 1
    if pieces <= 2 or windows.shape[0] < pieces:
        return attn(windows)
    out = torch.empty_like(windows)
    step = -(-windows.shape[0] // pieces)

    def part(i: int) -> None:
        out[i : i + step] = attn(windows[i : i + step])

    map_on_workers(part, range(0, windows.shape[0], step), windows.device)
    return out


def block(m: TinyViTBlock, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``m(x, hw)``: window attention on workers, folded local convolution, the MLP in chunks of tokens on
    workers, added in place."""
    h, w = hw
    b, n, c = x.shape
    x = x + window_attention(x, hw, m.window_size, lambda windows: attend_windows(m.attn, windows))
    x = conv_bn(m.local_conv, x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
    if n * c < WORKER_MIN_ELEMENTS:
        return x + mlp(m.mlp, x)
    x = x.contiguous()  # the local convolution's fresh output: ours to update

    def part(t0: int) -> None:
        xs = x[:, t0 : t0 + MLP_CHUNK_TOKENS]
        xs += mlp(m.mlp, xs)

    map_on_workers(part, range(0, n, MLP_CHUNK_TOKENS), x.device)
    return x


def conv_layer(layer: ConvLayer, x: torch.Tensor) -> torch.Tensor:
    for blk in layer.blocks:
        x = mbconv(blk, x)
    return patch_merging(layer.downsample, x)


def basic_layer(layer: BasicLayer, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    for blk in layer.blocks:
        x = block(blk, x, hw)
    if layer.downsample is not None:
        b, _, c = x.shape
        x = patch_merging(layer.downsample, x.transpose(1, 2).reshape(b, c, *hw))
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
    return x, hw


class FastTinyViT(TinyViT):
    """:class:`TinyViT` whose forward runs the functions above at inference (same weights, same
    function); the plain forward everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not active(self):
            return super().forward(x)
        # Channels-last from the start: the convolutions run faster so, and the stages' token layout
        # (B x HW x C) is then a view of their feature maps.
        x = x.contiguous(memory_format=torch.channels_last)
        first, _, second = self.patch_embed.seq
        x = conv_bn(second, _gelu_(conv_bn(first, x)))
        x = conv_layer(self.layers[0], x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers[1:]:
            x, hw = basic_layer(layer, x, hw)
        b, _, c = x.shape
        return self.neck(x.transpose(1, 2).reshape(b, c, *hw))
