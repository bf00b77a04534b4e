"""SAM's ViT image encoder: windowed + global attention with decomposed relative positions.

State-dict keys follow the official ``ImageEncoderViT`` so official checkpoints load unchanged.
Attention runs through ``scaled_dot_product_attention`` with the relative-position bias as its mask,
which is the same maths as the official code (softmax(q k^T * scale + bias) v) with a fused kernel.

At inference, :class:`segany.modeling.fast.image_encoder.FastImageEncoderViT` (what ``build_sam`` builds)
runs the same function in place and in pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import DropPath, LayerNorm2d, MLPBlock

# The blocks' norm, as SAM's builders pass it (``partial(nn.LayerNorm, eps=1e-6)``).
_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Image to patch embeddings: ``B x 3 x H x W -> B x H/p x W/p x C``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative positional embeddings for every (query, key) pair along one axis.

    Args:
        rel_pos: ``L x C`` learned table (interpolated when ``L != 2 * max(q_size, k_size) - 1``).
    Returns:
        ``q_size x k_size x C``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of MViTv2's decomposed relative positions.

    Args:
        q: ``B x heads x (H*W) x C`` queries (unscaled; any strides).
    Returns:
        ``rel_h`` ``B x heads x H x W x H`` (``q_ij . Rh[i,k]``) and ``rel_w`` ``B x heads x H x W x W``
        (``q_ij . Rw[j,l]``); the bias of query ``(i,j)`` on key ``(k,l)`` is their sum.
    """
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    b, nh, _, dim = q.shape
    r_q = q.reshape(b, nh, h, w, dim)
    # Contiguous (they are small), so that the sum of their broadcasts is contiguous too.
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).contiguous()
    return rel_h, torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).contiguous()


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The whole additive attention bias, ``B x heads x (H*W) x (H*W)``:
    ``bias[b, n, (i,j), (k,l)] = q_ij . Rh[i,k] + q_ij . Rw[j,l]``."""
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    b, nh, n, _ = q.shape
    return (rel_h[..., None] + rel_w[..., None, :]).reshape(b, nh, n, n)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with the decomposed relative-position bias.

    Args:
        q, k, v: ``B x heads x (H*W) x d`` (any strides).
    Returns:
        ``B x (H*W) x heads x d``.
    """
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over a ``B x H x W x C`` grid, with optional relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            assert input_size is not None, "relative positions need the input size"
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``B x H x W x C`` -> queries, keys and values, each ``B x heads x (H*W) x head_dim``."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.heads(x)
        if self.use_rel_pos:
            x = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
        else:
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(x.reshape(b, h, w, -1))


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``B x H x W x C -> (B*nW) x ws x ws x C``, zero-padding H and W up to multiples of ``ws``."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


class Block(nn.Module):
    """Transformer block; ``window_size == 0`` means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _LAYER_NORM,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ImageEncoderViT(nn.Module):
    """``B x 3 x S x S`` normalized image -> ``B x out_chans x S/p x S/p`` embedding."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _LAYER_NORM,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        """The official arguments (``norm_layer`` defaults to the LayerNorm SAM's builders pass, eps 1e-6)."""
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # Absolute positions, learned at the pre-training size.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token-major memory (C innermost): the sum would keep the convolution's channels-first layout,
        # and every block after it with it, making each LayerNorm and copy strided.
        x = (self.patch_embed(x) + self.pos_embed).contiguous()
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
