"""TinyViT image encoder, as used by MobileSAM.

Four stages at strides 4, 8, 16, 16: an MBConv stage, then three stages of windowed attention with a
learned per-offset bias and a depth-wise "local" convolution. The last patch merging keeps the
resolution so the embedding has SAM's stride of 16. State-dict keys follow MobileSAM's
``tiny_vit_sam.py`` (Conv2d_BN as ``c`` + ``bn``) so ``mobile_sam.pt`` loads unchanged; unlike it,
resolutions are read from the input at run time, so any input size that is a multiple of 16 works.

At inference, :class:`segany.modeling.fast.tiny_vit.FastTinyViT` (what ``build_sam`` builds) computes the
same function with folded batch norms, channels-last convolutions and work on one-core worker threads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import DropPath, LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Convolution (no bias) followed by batch norm; the keys are ``c.*`` and ``bn.*``."""

    def __init__(
        self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)



class PatchEmbed(nn.Module):
    """Two stride-2 convolutions: ``B x 3 x H x W -> B x C x H/4 x W/4``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depth-wise, 1x1 project)."""

    def __init__(self, chans: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden, ks=1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, chans, ks=1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """Downsample between stages: ``B x C x H x W -> B x (H/s * W/s) x C_out`` (s = 1 or 2)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class ConvLayer(nn.Module):
    """Stage 1: MBConv blocks then patch merging. Works on ``B x C x H x W``."""

    def __init__(self, dim: int, depth: int, out_dim: int, expand_ratio: float, drop_path: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window attention with a learned bias per (|dy|, |dx|) offset and head (LeViT style)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = key_dim  # attn_ratio 1, as in MobileSAM
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.d))
        self.proj = nn.Linear(num_heads * self.d, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        # 4-D: with a 3-D mask SDPA falls back to its unfused path on CPU.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Window attention + depth-wise local conv + MLP, on ``B x (H*W) x C`` tokens."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        b, n, c = x.shape
        x = x + self.drop_path(window_attention(x, hw, self.window_size, self.attn))
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


def window_attention(
    x: torch.Tensor, hw: tuple[int, int], ws: int, attend: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``attend`` (``nW x ws*ws x C`` -> same) within each ``ws x ws`` window of ``B x (H*W) x C`` tokens
    on an ``H x W`` grid (zero-padded to whole windows), back in token order."""
    h, w = hw
    b, n, c = x.shape
    if h == ws and w == ws:
        return attend(x)
    x = x.view(b, h, w, c)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // ws, pw // ws
    x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
    x = attend(x)
    x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
    if pad_b or pad_r:
        x = x[:, :h, :w].contiguous()
    return x.view(b, n, c)

class BasicLayer(nn.Module):
    """An attention stage: blocks, then (except for the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        local_conv_size: int,
        out_dim: int | None,
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, drop_path[i], local_conv_size) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, merge_stride) if out_dim is not None else None
        self.merge_stride = merge_stride

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        for blk in self.blocks:
            x = blk(x, hw)
        if self.downsample is not None:
            b, _, c = x.shape
            x = self.downsample(x.transpose(1, 2).reshape(b, c, *hw))
            hw = (x.shape[2], x.shape[3])
            x = x.flatten(2).transpose(1, 2)
        return x, hw


class TinyViT(nn.Module):
    """``B x 3 x S x S`` normalized image -> ``B x 256 x S/16 x S/16`` embedding."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        assert len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) == 4
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(5)]
        layers: list[nn.Module] = [
            ConvLayer(embed_dims[0], depths[0], embed_dims[1], mbconv_expand_ratio, dpr[starts[0] : starts[1]])
        ]
        for i in range(1, 4):
            layers.append(
                BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    dpr[starts[i] : starts[i + 1]],
                    local_conv_size,
                    out_dim=embed_dims[i + 1] if i < 3 else None,
                    # The merge into the last stage keeps the resolution: total stride 16, as SAM needs.
                    merge_stride=2 if i < 2 else 1,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](self.patch_embed(x))
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers[1:]:
            x, hw = layer(x, hw)
        b, _, c = x.shape
        return self.neck(x.transpose(1, 2).reshape(b, c, *hw))
