"""The ViT image encoder's inference path: the same function as
:class:`~segany.modeling.image_encoder.ImageEncoderViT`, computed in place and in pieces.

The plain code materialises a ``heads x 4096 x 4096`` relative-position bias (800 MB for ViT-B) in each
global block and a dozen other full-size temporaries per block; fresh large allocations are page-faulted
in by the kernel every time, which on a small CPU cost as much as the matmuls. Here windowed blocks
attend half a row of windows at a time, global blocks attend a block of query rows at a time (two
matmuls, the bias added to the scores in place), the projection and the MLP run on chunks of rows, and
the residual adds are in place: the working set stays in the CPU caches and allocations stay small. The
pieces are shared among one-core worker threads (robust on a busy machine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segany.modeling.fast.common import active, mlp_inplace
from segany.modeling.fast.workers import available_workers, map_on_workers
from segany.modeling.image_encoder import Attention, Block, ImageEncoderViT, rel_pos_terms

# Most bytes of relative-position bias built at once: a slab of query rows of a global block (windowed
# blocks need far less). The whole bias of a ViT-B global block is 800 MB; CPU flash attention slows down
# with fewer than ~1000 queries per call.
REL_BIAS_CHUNK_BYTES = 256 << 20
# Query rows per block in global attention (fp32): the scores of 256 rows (4 MB for 4096 keys) with
# matmuls large enough to run near the CPU's peak.
QUERY_BLOCK = 256
# Tokens that go through the projection and the MLP at once: the hidden activations of 1024 ViT-B tokens
# (12 MB) stay in the caches; matmuls of this height still run at full speed.
MLP_CHUNK_TOKENS = 1024


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """:func:`segany.modeling.image_encoder.rel_pos_attention` without autograd, in pieces.

    Args:
        q, k, v: ``B x heads x (H*W) x d`` (any strides).
    Returns:
        ``B x (H*W) x heads x d``.
    """
    b, nh, n, d = q.shape
    # Global attention in fp32: blocks of query rows by two plain matmuls, the bias added to the scores in
    # place (no bias tensor, no masked kernel). Windows (196 tokens) keep the fused kernel, as fast there;
    # bf16 keeps it too.
    blocked = n >= QUERY_BLOCK and q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    attend = _rel_pos_attention_rows if blocked else _rel_pos_attention_slabs
    workers = min(available_workers(q.device), nh)
    if workers <= 1:
        return attend(q, k, v, rel_pos_h, rel_pos_w, size)
    # Groups of heads on one-core workers (each with its own bias buffer).
    out = q.new_empty(b, n, nh, d)
    step = -(-nh // workers)

    def part(h0: int) -> None:
        hs = slice(h0, h0 + step)
        out[:, :, hs] = attend(q[:, hs], k[:, hs], v[:, hs], rel_pos_h, rel_pos_w, size)

    map_on_workers(part, range(0, nh, step), q.device)
    return out


def _rel_pos_attention_slabs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """:func:`rel_pos_attention` a slab of query rows at a time, each with the fused kernel."""
    b, nh, n, d = q.shape
    h, w = size
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    rows = max(1, min(h, REL_BIAS_CHUNK_BYTES // (b * nh * w * n * q.element_size())))
    rows = -(-h // -(-h // rows))  # equal slabs: 64 rows in 4 x 16, not 3 x 20 + 4
    buf = q.new_empty(b, nh, rows, w, h, w)
    out = None
    for r0 in range(0, h, rows):
        r = min(rows, h - r0)
        bias = buf[:, :, :r]
        torch.add(rel_h[:, :, r0 : r0 + r, :, :, None], rel_w[:, :, r0 : r0 + r, :, None, :], out=bias)
        o = F.scaled_dot_product_attention(q[:, :, r0 * w : (r0 + r) * w], k, v, attn_mask=bias.view(b, nh, r * w, n))
        if r == h:
            return o.transpose(1, 2)
        if out is None:
            out = q.new_empty(b, n, nh, d)
        out[:, r0 * w : (r0 + r) * w] = o.transpose(1, 2)
    return out


def _rel_pos_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """:func:`rel_pos_attention` head by head, :data:`QUERY_BLOCK` query rows at a time: the scores of a
    block (one matmul), plus the two bias factors broadcast in place, softmax in place, times the values
    (one matmul). The matmuls run near the CPU's peak; CPU flash attention with a mask also reads a
    materialised bias and runs smaller matmuls."""
    b, nh, n, d = q.shape
    h, w = size
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    out = q.new_empty(b, n, nh, d)
    scores = q.new_empty(QUERY_BLOCK, n)
    for i in range(b):
        for j in range(nh):
            kt = k[i, j].t() * d**-0.5  # d x n with the softmax scale (the bias is unscaled)
            rh, rw = rel_h[i, j].reshape(n, h), rel_w[i, j].reshape(n, w)
            for r0 in range(0, n, QUERY_BLOCK):
                r1 = min(r0 + QUERY_BLOCK, n)
                s = scores[: r1 - r0]
                torch.mm(q[i, j, r0:r1], kt, out=s)
                s.view(-1, h, w).add_(rh[r0:r1, :, None]).add_(rw[r0:r1, None, :])
                torch.softmax(s, -1, out=s)
                out[i, r0:r1, j] = torch.mm(s, v[i, j])
    return out


def attend(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``attn(x)`` before its output projection (``B x H x W x C`` -> ``B x H x W x C``), with the pieced
    relative-position attention."""
    b, h, w, _ = x.shape
    q, k, v = attn.heads(x)
    if attn.use_rel_pos:
        x = rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (h, w))
    else:
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return x.reshape(b, h, w, -1)


def window_row(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """One row of windows: ``B x r x W x C`` (``r <= ws``) -> ``(B*nW) x ws x ws x C``, zero-padded."""
    b, r, w, c = x.shape
    ws = window_size
    nw = -(-w // ws)
    if r != ws or w != nw * ws:
        padded = x.new_zeros(b, ws, nw * ws, c)
        padded[:, :r, :w] = x
        x = padded
    # Contiguous: with B = 1 the reshape is a strided view, and a linear layer on a strided 4-D input
    # can fall back to a batched matmul over copies of its weight (it did under bf16 autocast).
    return x.view(b, ws, nw, ws, c).transpose(1, 2).reshape(b * nw, ws, ws, c).contiguous()


def window_row_inverse(windows: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_row`: ``(B*nW) x ws x ws x C`` -> ``B x rows x width x C``."""
    bn, ws, _, c = windows.shape
    nw = -(-width // ws)
    x = windows.view(bn // nw, nw, ws, ws, c).transpose(1, 2).reshape(bn // nw, ws, nw * ws, c)
    return x[:, :rows, :width].contiguous()


def block_inplace(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` without autograd or drop path, computed in place in ``x`` (``B x H x W x C``, the
    caller's own tensor) in pieces whose working sets stay in the caches, shared among one-core worker
    threads (:mod:`segany.modeling.fast.workers`) when torch has several threads.

    Attention: a windowed block takes half a row of windows at a time (windows are independent); a global
    block splits its heads among the workers (and builds its bias a slab of query rows at a time). The
    attention projection and the MLP are per token: they run on chunks of rows, and skip the windows'
    zero padding (the plain code projects it too).
    """
    b, h, w, c = x.shape
    a = None
    if block.window_size > 0:
        ws = block.window_size
        nw = -(-w // ws)
        cols = -(-nw // 2) * ws  # two pieces per row of windows: more, evener work for the workers
        pieces = [(r0, c0) for r0 in range(0, h, ws) for c0 in range(0, w, cols)]

        def attention(piece: tuple[int, int]) -> None:
            r0, c0 = piece
            xs = x[:, r0 : r0 + ws, c0 : c0 + cols]
            out = attend(block.attn, window_row(block.norm1(xs), ws))
            xs += block.attn.proj(window_row_inverse(out, xs.shape[1], xs.shape[2]))

        map_on_workers(attention, pieces, x.device)
    else:
        a = attend(block.attn, block.norm1(x))
    rows = max(1, MLP_CHUNK_TOKENS // (b * w))

    def mlp(r0: int) -> None:
        xs = x[:, r0 : r0 + rows]
        if a is not None:
            xs += block.attn.proj(a[:, r0 : r0 + rows])
        xs += mlp_inplace(block.mlp, block.norm2(xs))

    map_on_workers(mlp, range(0, h, rows), x.device)
    return x


class FastImageEncoderViT(ImageEncoderViT):
    """:class:`ImageEncoderViT` whose forward runs :func:`block_inplace` at inference (same weights, same
    function); the plain forward everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not active(self):
            return super().forward(x)
        # Token-major memory (C innermost): the sum would keep the convolution's channels-first layout,
        # and every in-place block after it with it, making each LayerNorm and copy strided.
        x = (self.patch_embed(x) + self.pos_embed).contiguous()
        for blk in self.blocks:
            x = block_inplace(blk, x)  # x is this loop's own tensor
        return self.neck(x.permute(0, 3, 1, 2))
