"""SAM 2's image encoder: the Hiera trunk (hierarchical windowed ViT with query pooling) and the FPN neck.

Module and parameter names follow ``sam2.modeling.backbones`` so official checkpoints load unchanged
(``image_encoder.trunk.*``, ``image_encoder.neck.convs.{i}.conv.*``). Tokens are kept channels-last
(``B x H x W x C``) through the trunk, as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``B x H x W x C`` -> ``B*nW x window x window x C`` (zero-padded to a multiple), padded ``(Hp, Wp)``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``B*nW x window x window x C`` -> ``B x H x W x C``."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if hp > h or wp > w else x


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution: ``B x 3 x H x W`` -> ``B x H/4 x W/4 x C``."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Two linear layers with GELU between (keys ``layers.{0,1}``, as SAM 2's ``MLP``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.act(self.layers[0](x)))


def _pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """2-D max pooling of a channels-last ``B x H x W x C`` map."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries are optionally max-pooled (at a stage change)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> ``B x H' x W' x C_out`` (``H' = H / q_stride`` when pooling)."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).unbind(2)
        if self.q_stride:
            q = _pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Hiera block: (windowed) attention with optional query pooling, then an MLP; pre-norm residuals.

    Args:
        window_size: attention window on the block's input grid (0: global attention).
        q_stride: pool queries (and the shortcut) by this factor (0: no pooling).
    """

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float, window_size: int, q_stride: int = 0
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> ``B x H' x W' x C_out``."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = _pool(shortcut, self.q_stride)
        window = self.window_size
        if window > 0:
            h, w = x.shape[1:3]
            x, pad_hw = window_partition(x, window)
        x = self.attn(x)
        if self.q_stride:
            # The windows shrank with the queries; the padding is that of the pooled grid.
            window = self.window_size // self.q_stride
            h, w = shortcut.shape[1:3]
            pad_hw = (h + (window - h % window) % window, w + (window - w % window) % window)
        if self.window_size > 0:
            x = window_unpartition(x, window, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """Hiera trunk (https://arxiv.org/abs/2306.00989) as SAM 2 uses it: four stages, each starting (after
    the first) with query pooling that halves the grid and doubles width and heads.

    Args:
        embed_dim / num_heads: of the first stage.
        stages: blocks per stage.
        global_att_blocks: indices of the blocks with global attention.
        window_spec: attention window per stage.
        window_pos_embed_bkg_spatial_size: grid of the background positional embedding (interpolated).
    Returns (forward): the four stage outputs ``B x C_i x H/2^(i+2) x W/2^(i+2)``, finest first.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: tuple[int, ...] = (2, 3, 16, 3),
        global_att_blocks: tuple[int, ...] = (12, 16, 20),
        window_spec: tuple[int, ...] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        q_pool: int = 3,
        q_stride: int = 2,
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("stages and window_spec must have the same length")
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        stage = 0
        for i in range(sum(stages)):
            dim_out = embed_dim
            # The first block of a stage pools from the previous stage's grid: its window is the
            # previous stage's (it shrinks with the queries).
            window = 0 if i in global_att_blocks else window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    embed_dim, dim_out, num_heads, mlp_ratio, window, q_stride if i in q_pool_blocks else 0
                )
            )
            embed_dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends[::-1]]

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """Background embedding (bicubic to ``hw``) plus the tiled window embedding: ``1 x H x W x C``."""
        pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        win = self.pos_embed_window
        pos = pos + win.tile([p // w for p, w in zip(pos.shape, win.shape)])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self._pos_embed(tuple(x.shape[1:3]))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class FpnNeck(nn.Module):
    """SAM 2's FPN: a 1x1 lateral conv per level to ``d_model``; top-down (nearest 2x upsampling, summed)
    only into ``fpn_top_down_levels``. No output convs.

    Args:
        backbone_channel_list: trunk widths, coarsest first (``Hiera.channel_list``).
    """

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: list[int],
        fpn_top_down_levels: tuple[int, ...] = (2, 3),
        fpn_interp_model: str = "nearest",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:
            level = nn.Sequential()
            level.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(level)
        self.fpn_top_down_levels = list(fpn_top_down_levels)
        self.fpn_interp_model = fpn_interp_model

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk outputs (finest first) -> ``d_model``-wide maps at the same resolutions."""
        n = len(self.convs) - 1
        out: list[torch.Tensor] = [xs[0]] * len(xs)
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                align = None if self.fpn_interp_model == "nearest" else False
                top_down = F.interpolate(
                    prev.to(torch.float32), scale_factor=2.0, mode=self.fpn_interp_model, align_corners=align
                )
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
        return out


class Sam2ImageEncoder(nn.Module):
    """Trunk + neck, dropping the ``scalp`` coarsest levels: ``B x 3 x H x W`` -> maps at strides 4, 8, 16
    (``d_model`` channels), finest first. The positional encodings of the levels (used by SAM 2's video
    memory, not by image prediction) are not computed here."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(f"trunk widths {trunk.channel_list} != neck's {neck.backbone_channel_list}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.neck(self.trunk(x))
        return features[: -self.scalp] if self.scalp > 0 else features
