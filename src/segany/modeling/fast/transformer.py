"""SAM's two-way transformer at inference, its image side by bands of image tokens.

Where every image token differs from prompt to prompt (a mask input changes every cell of the dense
embedding, so the re-associated decoder does not apply), the plain transformer makes each of its image-side
``N x C`` tensors in a separate pass over memory: the sum with the positional encoding, three projections,
the image-to-token attention (a flash-attention call for each image token over a handful of prompt tokens),
its output projection, the residual sum and the layer norm. Here no image token is projected: both
attentions are re-associated, so that the prompt tokens' side is multiplied into the weights instead
(:func:`_token_to_image`, :func:`_image_to_token`), and a block's image-to-token step, residual, layer norm
and sum with the encoding run together on bands of :data:`BAND` tokens, which stay in the CPU caches between
the operations. Same function as :class:`~segany.modeling.transformer.TwoWayTransformer` (outputs equal up to
float rounding).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.fast.common import active
from segany.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

# Image tokens per band: a band's tensors (up to 512 x 256 floats each) stay in a core's L2 cache.
BAND = 512


class FastTwoWayTransformer(TwoWayTransformer):
    """:class:`TwoWayTransformer` whose image side runs by bands of tokens at inference on a CPU (see the
    module's notes); the plain forward everywhere else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pe_tokens: tuple | None = None  # (weak ref to a positional encoding, its tokens): tokens_pe

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pe_tokens"] = None  # a weak reference does not pickle; only a cache
        return state

    def tokens_pe(self, image_pe: torch.Tensor) -> torch.Tensor:
        """``image_pe`` (``1 x C x h x w``, or the same encoding expanded to every prompt as the decoders pass
        it) as ``1 x N x C`` tokens, kept for the next call with the same encoding (the transpose reads the
        map across its rows: a slow copy); an encoding per prompt as ``B x N x C``."""
        if image_pe.shape[0] > 1 and image_pe.stride(0) != 0:
            return image_pe.flatten(2).transpose(1, 2).contiguous()
        root = image_pe._base if image_pe._base is not None else image_pe
        version = None if root.is_inference() else root._version
        key = (tuple(image_pe.shape[1:]), image_pe.stride()[1:], image_pe.storage_offset(), version)
        c = self._pe_tokens
        if c is not None and c[0]() is root and c[1] == key:
            return c[2]
        tokens = image_pe[:1].flatten(2).transpose(1, 2).contiguous()
        self._pe_tokens = (weakref.ref(root), key, tokens)
        return tokens

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (active(self) and image_embedding.device.type == "cpu" and supports(self)):
            return super().forward(image_embedding, image_pe, point_embedding)
        return _banded(self, image_embedding, image_pe, point_embedding)


def supports(transformer: nn.Module) -> bool:
    """True for a :class:`TwoWayTransformer` of the official layout (every attention the plain one)."""
    return isinstance(transformer, TwoWayTransformer) and all(
        type(layer) is TwoWayAttentionBlock
        and all(
            type(a) is Attention
            for a in (layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)
        )
        for layer in transformer.layers
    )


def _token_to_image(attn: Attention, q: torch.Tensor, keys: torch.Tensor, with_pe: torch.Tensor) -> torch.Tensor:
    """A token-to-image attention re-associated: the prompt tokens ``q`` (``B x T x C``, with their encoding)
    over the image tokens ``keys`` and ``with_pe`` (the same plus the encoding, ``B x N x C``) without
    projecting the ``N`` image tokens. Each head's scores are ``(q W_q + b_q) W_k^T X^T`` plus a constant per
    row (the key bias's term, which the softmax removes), and its output ``P (Y W_v^T + b_v) = (P Y) W_v^T +
    b_v`` (the weights ``P`` of a row sum to 1)."""
    h, dh = attn.num_heads, attn.internal_dim // attn.num_heads
    b, t, c = q.shape
    qh = attn.q_proj(q).view(b, t, h, dh) * dh**-0.5
    qk = torch.einsum("bthd,hdc->bhtc", qh, attn.k_proj.weight.view(h, dh, c)).reshape(b, h * t, c)
    p = torch.softmax(torch.bmm(qk, with_pe.transpose(1, 2)), dim=-1)  # B x H*T x N
    ctx = torch.bmm(p, keys).view(b, h, t, c)
    out = torch.einsum("bhtc,hdc->bthd", ctx, attn.v_proj.weight.view(h, dh, c)).reshape(b, t, h * dh)
    return attn.out_proj(out + attn.v_proj.bias)


def _image_to_token(attn: Attention, q: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An image-to-token attention re-associated for bands of image tokens: for each prompt (``q``: its
    tokens with their encoding, ``queries`` without; ``B x T x C``) the matrices that take a band of image
    tokens with their encoding ``X`` (``m x C``) to the attention scores ``S = A X^T + a`` (``H*T x m``: each
    head's scores over the ``T`` tokens, the softmax's axis, before the band's axis, which keeps the softmax
    on long rows) and the softmax weights ``P`` to the attention's output ``P^T B + b`` (``m x C``, the output
    projection included): ``A``, ``a``, ``B``, ``b``."""
    h, dh = attn.num_heads, attn.internal_dim // attn.num_heads
    b, t, _ = q.shape
    k = attn.k_proj(q).view(b, t, h, dh) * dh**-0.5  # the tokens as keys, scaled as SDPA scales
    v = attn.v_proj(queries).view(b, t, h, dh)
    wq = attn.q_proj.weight.view(h, dh, -1)  # H x dh x C
    wo = attn.out_proj.weight.t().reshape(h, dh, -1)  # H x dh x C
    a = torch.einsum("bthd,hdc->bhtc", k, wq).reshape(b, h * t, -1)
    a_bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.view(h, dh)).reshape(b, h * t, 1)
    out = torch.einsum("bthd,hdc->bhtc", v, wo).reshape(b, h * t, -1)
    return a, a_bias, out, attn.out_proj.bias


def _banded(
    tr: FastTwoWayTransformer, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = image_embedding.shape
    n = h * w
    keys = image_embedding.flatten(2).transpose(1, 2).contiguous()  # B x N x C, updated in place
    pe = tr.tokens_pe(image_pe)  # B or 1 x N x C
    with_pe = keys + pe  # kept equal to keys + pe, band by band
    bands = [(r0, min(r0 + BAND, n)) for r0 in range(0, n, BAND)]
    queries = point_embedding
    for layer in tr.layers:
        queries = layer.attend_tokens(queries, point_embedding)
        q = queries + point_embedding
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, q, keys, with_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        attn = layer.cross_attn_image_to_token
        a, a_bias, out, out_bias = _image_to_token(attn, queries + point_embedding, queries)
        norm = layer.norm4
        for i in range(b):
            pe_i = pe[i if pe.shape[0] > 1 else 0]
            for r0, r1 in bands:
                band, band_pe = keys[i, r0:r1], with_pe[i, r0:r1]
                scores = torch.addmm(a_bias[i], a[i], band_pe.t())  # H*T x m
                p = torch.softmax(scores.view(attn.num_heads, -1, r1 - r0), dim=1).view_as(scores)
                band.addmm_(p.t(), out[i]).add_(out_bias)
                band.copy_(F.layer_norm(band, (c,), norm.weight, norm.bias, norm.eps))
                torch.add(band, pe_i[r0:r1], out=band_pe)
    q = queries + point_embedding
    queries = tr.norm_final_attn(queries + _token_to_image(tr.final_attn_token_to_image, q, keys, with_pe))
    return queries, keys
