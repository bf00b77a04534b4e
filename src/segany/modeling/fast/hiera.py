"""SAM 2's Hiera trunk at inference: the same function as :class:`~segany.modeling.hiera.Hiera`, computed in
place and in bands of rows.

The plain trunk makes a dozen full-size temporaries per block (the normed tokens, the zero-padded windows,
their ``3C``-wide projections, the attention output, its unpartitioned copy, the residual sums, the MLP's
``4C``-wide hidden tokens and its GELU); at the first stage's 256 x 256 grid each is 25-150 MB, and on a
small CPU writing fresh memory costs about as much as the matmuls. Here a windowed block attends one row
of windows at a time (windows are independent), the projections and the MLP run on chunks of rows (with
the bias and GELU fused into the product), and the residual adds are in place, so the working set stays
in the CPU caches. A block that pools its queries (a stage change) runs by bands of one row of windows too:
its pooled shortcut and pooled windows of a band are those rows of the plain outputs. The positional
embedding (a bicubic resize of the background embedding plus the tiled window embedding) is kept between
calls while the weights and the grid are unchanged. Pieces are shared among one-core worker threads
(:mod:`segany.modeling.fast.workers`) when torch has several.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segany.modeling.fast.common import active, linear_act, weights_key
from segany.modeling.fast.image_encoder import window_row, window_row_inverse
from segany.modeling.fast.workers import map_on_workers
from segany.modeling.hiera import Hiera, MultiScaleBlock

# Tokens through the MLP at once: the 4C-wide hidden activations of 1024 tokens (1.5 MB at C = 96, 6 MB at
# C = 384) stay in the caches; matmuls of this height still run at full speed.
MLP_CHUNK_TOKENS = 1024


def _mlp_inplace(block: MultiScaleBlock, x: torch.Tensor) -> None:
    """``x += block.mlp(block.norm2(x))`` on ``B x H x W x C`` (the caller's own tensor), by chunks of rows."""
    b, h, w, c = x.shape
    lin1, lin2 = block.mlp.layers
    w1, w2 = lin1.weight.t(), lin2.weight.t()
    rows = max(1, MLP_CHUNK_TOKENS // (b * w))

    def chunk(r0: int) -> None:
        xs = x[:, r0 : r0 + rows]
        y = block.norm2(xs).view(-1, c)
        y = linear_act(linear_act(y, w1, lin1.bias, block.mlp.act), w2, lin2.bias, None)
        xs += y.view(xs.shape)

    map_on_workers(chunk, range(0, h, rows), x.device)


def block_inplace(block: MultiScaleBlock, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a block that keeps its width and grid, in place in ``x`` (``B x H x W x C``, the
    caller's own contiguous tensor). Windowed: one row of windows at a time (attention and its projection,
    added to the rows); global: one attention over all tokens. Then the MLP by chunks of rows."""
    ws = block.window_size
    if ws > 0:
        h = x.shape[1]

        def band(r0: int) -> None:
            xs = x[:, r0 : r0 + ws]
            out = block.attn(window_row(block.norm1(xs), ws))
            xs += window_row_inverse(out, xs.shape[1], xs.shape[2])

        map_on_workers(band, range(0, h, ws), x.device)
    else:
        x += block.attn(block.norm1(x))
    _mlp_inplace(block, x)
    return x


def pooling_block_applies(block: MultiScaleBlock, hw: tuple[int, int]) -> bool:
    """True where :func:`pooling_block` computes ``block``: a windowed block whose windows tile the grid
    exactly and hold whole pooling cells (the official layouts at sizes that are multiples of 32)."""
    ws, s = block.window_size, max(block.q_stride, 1)
    return ws > 0 and ws % s == 0 and hw[0] % ws == 0 and hw[1] % ws == 0


def pooling_block(block: MultiScaleBlock, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a block that changes width (and pools its queries), by bands of one row of windows:
    ``B x H x W x C`` -> a new ``B x H/s x W/s x C_out`` tensor (``s`` the query stride, or 1)."""
    b, h, w, _ = x.shape
    ws, s = block.window_size, max(block.q_stride, 1)
    out = x.new_empty(b, h // s, w // s, block.dim_out)

    def band(r0: int) -> None:
        xn = block.norm1(x[:, r0 : r0 + ws])
        shortcut = block.proj(xn)
        if block.q_stride:
            shortcut = F.max_pool2d(shortcut.permute(0, 3, 1, 2), s, s).permute(0, 2, 3, 1)
        attn = block.attn(window_row(xn, ws))  # B*nW x ws/s x ws/s x C_out
        torch.add(shortcut, window_row_inverse(attn, ws // s, w // s), out=out[:, r0 // s : (r0 + ws) // s])

    map_on_workers(band, range(0, h, ws), x.device)
    _mlp_inplace(block, out)
    return out


class FastHiera(Hiera):
    """:class:`Hiera` whose forward runs :func:`block_inplace` / :func:`pooling_block` at inference (same
    weights, same function up to float rounding); the plain forward everywhere else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pos_cache: tuple | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pos_cache"] = None  # only a cache
        return state

    def _cached_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """:meth:`Hiera._pos_embed` (``1 x H x W x C``, contiguous), made again only when a weight or the
        grid changes (a bicubic resize per image otherwise)."""
        key = (hw, *weights_key(self.pos_embed, self.pos_embed_window))
        if self._pos_cache is None or self._pos_cache[0] != key:
            self._pos_cache = (key, self._pos_embed(hw).contiguous())
        return self._pos_cache[1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not active(self):
            return super().forward(x)
        x = self.patch_embed.proj(x)  # B x C x H x W
        b, c, h, w = x.shape
        # Token-major (C innermost) for every block after this: their layer norms, products and in-place
        # adds then read contiguous rows.
        tokens = x.new_empty(b, h, w, c)
        torch.add(x.permute(0, 2, 3, 1), self._cached_pos_embed((h, w)), out=tokens)
        x = tokens
        outputs = []
        for i, block in enumerate(self.blocks):
            if block.dim == block.dim_out and not block.q_stride:
                if outputs and i - 1 in self.stage_ends:
                    x = x.clone()  # the stage output just taken must not change
                x = block_inplace(block, x)
            elif pooling_block_applies(block, tuple(x.shape[1:3])):
                x = pooling_block(block, x)
            else:
                x = block(x).contiguous()
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
