"""SAM's mask decoder re-associated for one image and many prompts without a mask input.

Same function as :class:`~segany.modeling.mask_decoder.MaskDecoder` (outputs equal up to float rounding),
with the work ordered for the CPU: the prompt-independent image side is computed once per image, the
image tokens of each prompt are kept in factored form (a per-image part plus a small per-prompt part,
:mod:`segany.modeling.fast.factored`), and prompts are decoded a few at a time by one-core worker threads.
The automatic mask generator uses it for its point grid, and
:class:`~segany.modeling.fast.mask_decoder.FastMaskDecoder` for prompts without a mask input.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import LayerNorm2d
from segany.modeling.fast.common import activate_, linear_act, mlp_inplace
from segany.modeling.fast.dense_cells import DenseCells, cell_size, click_cells, constant_dense
from segany.modeling.fast.factored import FactoredDecoderSide, FactoredTokens, TokenProduct
from segany.modeling.fast.workers import available_workers, map_on_workers
from segany.modeling.low_res import decoded_region
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.transformer import TwoWayTransformer

R = TypeVar("R")

# Prompts decoded together: their products with the per-image matrices share one read of those (2 MB
# each), while their per-prompt coefficients (about 2 MB each) still mostly stay in the CPU caches
# (benchmarks/README.md: the sizes tried).
DECODE_CHUNK = 4
# Most threads that decode prompts side by side (each on one core; see ReassociatedDecoder.decode).
DECODE_WORKERS = 8
# The upscaling runs by bands of image-token rows holding about this many bytes of its second transposed
# convolution's output (:func:`upscale_rows`): 16 rows of SAM's 64-token-wide grid at 256 channels, whose
# maps then stay in the CPU caches between the layer norm, the second convolution and the masks' product;
# the whole grid of segany's default model, whose smaller maps gain more from fewer, larger operations
# (benchmarks/README.md).
UPSCALE_BAND_BYTES = 2 << 20


def _projected(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin`` applied to the columns of ``x`` (``C x N``): ``D x N``."""
    return torch.addmm(lin.bias[:, None], lin.weight, x)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``B x T x (H*d)`` -> ``B x H x T x d``."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``B x H x T x d`` -> ``B x T x (H*d)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class ReassociatedDecoder:
    """SAM's mask decoder for one image embedding and many prompts without a mask input, re-associated.

    Same function as :class:`~segany.modeling.mask_decoder.MaskDecoder` (outputs equal up to float
    rounding); the order of the work is what changes:

    * The first block's image side does not depend on the prompt (the image embedding plus the
      no-mask embedding): its projections are computed once per image, not once per prompt.
    * After it, a prompt changes the ``N = 64*64`` image tokens only by low-rank updates (attention
      weights over the ``T = 7`` prompt tokens times their values) and LayerNorms: the tokens are kept
      as ``diag(s) K M + L^T R`` (:class:`~segany.modeling.fast.factored.FactoredTokens`), and every projection
      of them is a per-image product plus ``N x r`` coefficients times a small matrix. No ``N x C`` tensor
      is made per prompt in the transformer, and the upscaling's first product is the same
      factored sum (its per-image part computed once).
    * Prompts go through a few at a time (:data:`DECODE_CHUNK`), sharing the reads of the per-image
      products.
    * A model that draws the clicks into its dense embedding: the per-image side takes the vector of the
      cells no click touches, and each prompt's few other cells (:mod:`~segany.modeling.fast.dense_cells`)
      are corrections at those tokens in the first block, then extra rows of its factored tokens.
    * The IoU head runs before the upscaling: prompts none of whose masks pass ``iou_thresh`` are not
      upscaled at all.
    * The upscaling runs channels-last (each stride-2 transposed convolution is one matmul, the layer
      norm is the fused kernel), only over the image tokens that the post-processing reads (not the
      input padding), and pixels are put back in place only for the output masks.
    """

    def __init__(
        self,
        mask_decoder: nn.Module,
        features: torch.Tensor,
        dense: torch.Tensor,
        image_pe: torch.Tensor,
        image_size: int | None = None,
    ) -> None:
        """
        Args:
            features: the ``1 x C x h x w`` image embedding.
            dense: the dense prompt embedding shared by all prompts, ``C`` or broadcastable to
                ``1 x C x h x w`` (the prompt encoder's no-mask embedding).
            image_pe: the ``1 x C x h x w`` positional encoding (``PromptEncoder.get_dense_pe()``).
            image_size: the model's input size (needed by :meth:`region` only).
        """
        self.md = md = mask_decoder
        self.tr = tr = md.transformer
        self.hw = tuple(features.shape[-2:])
        self.image_size = image_size
        dense = dense.reshape(1, -1, 1, 1) if dense.ndim == 1 else dense
        # The image side in its natural C x N layout: projections are W @ X products that come out per head
        # as H x d x N, contiguous, with no transposed copies of the N x C tokens.
        src = (features + dense)[0].flatten(1)  # C x N
        pe_cn = image_pe[0].flatten(1)
        k = src + pe_cn
        first = tr.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self.k0 = _projected(t2i.k_proj, k).view(t2i.num_heads, -1, k.shape[1])  # H x d x N
        self.q0 = _projected(i2t.q_proj, k).view(i2t.num_heads, -1, k.shape[1])
        v = _projected(t2i.v_proj, src).view(t2i.num_heads, -1, k.shape[1])
        self.v0 = v.transpose(1, 2).contiguous()  # H x N x d
        # The later blocks see the image tokens in factored form (modeling/factored.py), from the tokens
        # plus the first image-to-token attention's output bias (the same for every prompt), centered (the
        # LayerNorm after it removes each token's mean).
        keys = src.t().contiguous()  # N x C
        keys += i2t.out_proj.bias
        keys -= keys.mean(-1, keepdim=True)
        self.side = FactoredDecoderSide(tr, keys, pe_cn.t(), self.pe_products(md, image_pe))
        self._up_weights: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def pe_products(mask_decoder: nn.Module, image_pe: torch.Tensor) -> dict:
        """The cache of products of the positional encoding, which is the same for every image: kept on
        ``mask_decoder`` while ``image_pe`` is the same tensor (``PromptEncoder.get_dense_pe`` keeps it),
        its entries keyed by the weights' versions (see :meth:`FactoredDecoderSide._pe_proj`)."""
        cache = getattr(mask_decoder, "_pe_products", None)
        if cache is None or cache[0]() is not image_pe:
            cache = (weakref.ref(image_pe), {})
            if hasattr(mask_decoder, "_pe_products"):
                mask_decoder._pe_products = cache
        return cache[1]

    @classmethod
    def for_model(cls, model: nn.Module, features: torch.Tensor) -> ReassociatedDecoder:
        """The decoder of a :class:`~segany.modeling.sam.Sam` for prompts without a mask input (and, for a
        model that draws clicks into its dense embedding, without a box: see :meth:`embed_points`)."""
        pe = model.prompt_encoder
        dense = constant_dense(pe) if getattr(pe, "dense_prompts", False) else pe.no_mask_embed.weight[0]
        return cls(model.mask_decoder, features, dense, pe.get_dense_pe(), model.image_size)

    @staticmethod
    def embed_points(
        prompt_encoder: nn.Module, points: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, DenseCells | None]:
        """Point prompts (``B x N x 2`` coordinates in the input frame, ``B x N`` labels) for :meth:`decode`:
        their sparse tokens and, for a prompt encoder that draws the clicks into its dense embedding, the
        cells where that differs from the per-image vector (:mod:`~segany.modeling.fast.dense_cells`; no
        ``B x C x h x w`` dense embedding is made)."""
        if not getattr(prompt_encoder, "dense_prompts", False):
            return prompt_encoder(points=points, boxes=None, masks=None)[0], None
        # The plain encoder's tokens (the dense encoder's are the same; its dense part is what is skipped).
        sparse = PromptEncoder.forward(prompt_encoder, points, None, None)[0]
        return sparse, click_cells(prompt_encoder, points)

    @staticmethod
    def supports(decoder: nn.Module) -> bool:
        """True for the standard SAM decoder (the layout this class re-associates) of a model whose dense
        embedding without a mask input is one vector for every pixel, or that vector plus a few cells per
        click (:mod:`~segany.modeling.fast.dense_cells`); ``decoder`` is a ``MaskDecoder`` or a model that
        has one."""
        pe = getattr(decoder, "prompt_encoder", None)
        if getattr(pe, "dense_prompts", False) and cell_size(pe) is None:
            return False  # its dense embedding differs from prompt to prompt everywhere
        md = getattr(decoder, "mask_decoder", decoder)
        if not isinstance(md, MaskDecoder) or not isinstance(md.transformer, TwoWayTransformer):
            return False
        up = md.output_upscaling
        if not isinstance(up, nn.Sequential) or len(up) != 5 or not len(md.transformer.layers):
            return False
        convs_ok = all(
            isinstance(up[i], nn.ConvTranspose2d)
            and up[i].kernel_size == (2, 2)
            and up[i].stride == (2, 2)
            and up[i].padding == (0, 0)
            and up[i].output_padding == (0, 0)
            and up[i].groups == 1
            and up[i].dilation == (1, 1)
            and up[i].bias is not None
            for i in (0, 3)
        )
        return convs_ok and isinstance(up[1], LayerNorm2d)

    def region(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Image tokens whose upscaled logits the post-processing of an ``input_size`` input reads (the
        rest lies in the padding): ``(rows, cols)`` from the top left."""
        return decoded_region(input_size, self.hw, self.image_size)

    # -- attention ------------------------------------------------------------------------------------

    def _t2i_shared(self, attn: nn.Module, q: torch.Tensor, cells: DenseCells | None = None) -> torch.Tensor:
        """Tokens (``B x T x C``) attend to the first block's prompt-independent image keys/values (plus the
        prompts' ``cells``: their keys and values there change by the projections of the differences)."""
        b, t, _ = q.shape
        qh = _heads(attn.q_proj(q), attn.num_heads)  # B x H x T x d
        h, d = qh.shape[1], qh.shape[3]
        n = self.k0.shape[2]
        qh = qh.transpose(0, 1).reshape(h, b * t, d) * d**-0.5  # the softmax scale, on the small side
        s = torch.bmm(qh, self.k0)  # H x BT x N
        if cells is not None:
            index = self._add_cells(s.view(h, b, t, n), qh.view(h, b, t, d), attn.k_proj, cells)
        a = s.softmax(-1)
        out = torch.bmm(a, self.v0).view(h, b, t, d)  # H x B x T x d
        if cells is not None:  # sum over the cells of weight x projected difference
            dv = _heads(F.linear(cells.delta, attn.v_proj.weight), h).transpose(0, 1)  # H x B x k x d
            out = out + torch.matmul(a.view(h, b, t, n).gather(3, index), dv)
        return attn.out_proj(_merge(out.transpose(0, 1)))

    @staticmethod
    def _add_cells(s: torch.Tensor, qh: torch.Tensor, lin: nn.Linear, cells: DenseCells) -> torch.Tensor:
        """Scores ``s`` (``H x B x T x N``) of queries ``qh`` (``H x B x T x d``) against the per-image image
        tokens projected by ``lin``: plus, at the prompts' cells, the queries dotted with the projected
        differences (no bias: it is in the per-image part). Returns the cells' index, ``H x B x T x k``."""
        h, b, t, _ = qh.shape
        k = cells.index.shape[1]
        dk = _heads(F.linear(cells.delta, lin.weight), h).transpose(0, 1)  # H x B x k x d
        index = cells.index[None, :, None, :].expand(h, b, t, k)
        s.scatter_add_(3, index, torch.matmul(qh, dk.transpose(2, 3)))
        return index

    def _t2i(self, attn: nn.Module, x: FactoredTokens, q: torch.Tensor) -> torch.Tensor:
        """Tokens (``B x T x C``) attend to the factored image tokens ``x``."""
        qh = _heads(attn.q_proj(q), attn.num_heads)
        qh = qh * qh.shape[-1] ** -0.5  # the softmax scale, on the small side
        a = self.side.scores(x, attn.k_proj, qh).softmax(-1)  # B x H x T x N
        return attn.out_proj(_merge(self.side.mixed(x, attn.v_proj, a)))

    def _i2t_shared(
        self, attn: nn.Module, k_tok: torch.Tensor, v_tok: torch.Tensor, cells: DenseCells | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first block's image tokens attend to the tokens: scores ``B x H x T x N`` (softmax over T
        to come) and the tokens' values per head ``B x H x T x d`` (the update, see
        :meth:`FactoredDecoderSide.add_attention`). ``cells``: the prompts' differences of the image tokens."""
        kh = _heads(attn.k_proj(k_tok), attn.num_heads)  # B x H x T x d
        b, h, t, d = kh.shape
        n = self.q0.shape[2]
        kh = kh.transpose(0, 1).reshape(h, b * t, d) * d**-0.5  # the softmax scale, on the small side
        s = torch.bmm(kh, self.q0)  # H x BT x N
        if cells is not None:
            self._add_cells(s.view(h, b, t, n), kh.view(h, b, t, d), attn.q_proj, cells)
        return s.view(h, b, t, n).transpose(0, 1), _heads(attn.v_proj(v_tok), h)

    def _i2t(
        self, attn: nn.Module, x: FactoredTokens, k_tok: torch.Tensor, v_tok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The factored image tokens attend to the tokens: as :meth:`_i2t_shared`."""
        kh = _heads(attn.k_proj(k_tok), attn.num_heads)
        kh = kh * kh.shape[-1] ** -0.5
        return self.side.scores(x, attn.q_proj, kh), _heads(attn.v_proj(v_tok), attn.num_heads)

    # -- the decoder ------------------------------------------------------------------------------------

    def block(
        self,
        j: int,
        layer: nn.Module,
        queries: torch.Tensor,
        qpe: torch.Tensor,
        x: FactoredTokens | None,
        cells: DenseCells | None = None,
    ) -> tuple[torch.Tensor, FactoredTokens]:
        """Two-way block ``j`` (``layer``) on prompt tokens ``queries`` (``B x T x C``, positional part
        ``qpe``) and image tokens ``x`` (None: still the shared, per-image ones, plus the prompts' dense
        ``cells`` if any): the block's token side as the plain code, its image side in factored form."""
        queries = layer.attend_tokens(queries, qpe)
        q = queries + qpe
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if x is None:
            queries = layer.norm2(queries + self._t2i_shared(t2i, q, cells))
        else:
            queries = layer.norm2(queries + self._t2i(t2i, x, q))
        queries = layer.norm3(queries + mlp_inplace(layer.mlp, queries))
        q = queries + qpe
        a, v = self._i2t_shared(i2t, q, queries, cells) if x is None else self._i2t(i2t, x, q, queries)
        extra = None if x is not None or cells is None else (cells.index, cells.delta)
        return queries, self.side.layer_norm(self.side.add_attention(x, j, a, v, extra), layer.norm4)

    def tokens(
        self, sparse: torch.Tensor, cells: DenseCells | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, FactoredTokens]:
        """Sparse prompt embeddings ``B x T' x C`` (and, for a model that draws clicks into its dense
        embedding, their ``cells``: :meth:`embed_points`) -> IoU predictions ``B x M``, mask tokens
        ``B x M x C``, and the image tokens after the transformer, in factored form."""
        md, tr = self.md, self.tr
        b = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        qpe = torch.cat([out_tokens[None].expand(b, -1, -1), sparse.to(out_tokens.dtype)], dim=1)
        queries = qpe
        x: FactoredTokens | None = None  # None while the image tokens are still the shared ones
        for j, layer in enumerate(tr.layers):
            queries, x = self.block(j, layer, queries, qpe, x, cells if j == 0 else None)
        q = queries + qpe
        queries = tr.norm_final_attn(queries + self._t2i(tr.final_attn_token_to_image, x, q))
        iou = md.iou_prediction_head(queries[:, 0])
        return iou, queries[:, 1 : 1 + md.num_mask_tokens], x

    def masks(
        self, x: FactoredTokens, mask_tokens: torch.Tensor, which: list[int], region: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Low-res mask logits ``B x len(which) x 4h x 4w`` of mask outputs ``which`` (image tokens ``x`` and
        mask tokens ``B x M x C`` from :meth:`tokens`).

        ``region=(h, w)``: only the top-left ``h x w`` image tokens (the upscaling works pixel by pixel, so
        the logits there are the same), giving ``4h x 4w`` logits.
        """
        md = self.md
        b = x.batch
        h, w = region or self.hw
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in which], dim=1)
        out = hyper.new_empty(b, len(which), 4 * h, 4 * w)
        w1, b1, _w2, _b2 = self._upscaling_weights()
        for i in range(b):
            first = self.side.linear_tokens(x if b == 1 else x.select(i), "upscaling", w1, b1, self.hw)
            # Bands of image-token rows (the upscaling works pixel by pixel). Not on one-core workers: this
            # runs on the calling thread right after the prompt's transformer (torch's threads), whose
            # OpenMP threads then spin-wait for a while on the cores the workers would need.
            step = upscale_rows(w, self.md.output_upscaling[3].out_channels)
            for r0 in range(0, h, step):
                r1 = min(r0 + step, h)
                out[i, :, 4 * r0 : 4 * r1] = self._upscale(first, hyper[i], (r0, r1), w)
        return out

    def _upscaling_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`upscaling_matrices`, made once per image."""
        if self._up_weights is None:
            self._up_weights = upscaling_matrices(self.md)
        return self._up_weights

    def _upscale(self, first: TokenProduct, hyper: torch.Tensor, rows: tuple[int, int], w: int) -> torch.Tensor:
        """The first transposed convolution's product ``first``, image-token rows ``rows``, the first ``w``
        columns, and hypernetwork outputs ``K x C/8`` -> logits ``K x 4h x 4w``.

        The upscaling runs channels-last: each transposed convolution is one matmul (the first on the
        factored tokens, the second with bias and GELU fused at inference), the layer norm is the fused
        kernel."""
        _up1, norm, act1, up2, act2 = self.md.output_upscaling
        _w1, _b1, w2, b2 = self._upscaling_weights()
        h = rows[1] - rows[0]
        n = h * w
        c1, c2 = up2.in_channels, up2.out_channels
        x1 = first.block(rows[0], rows[1], w).view(n, 4, c1)
        x1 = activate_(F.layer_norm(x1, (c1,), norm.weight, norm.bias, norm.eps), act1)
        x2 = linear_act(x1.view(n * 4, c1), w2, b2, act2)
        return in_pixel_order(torch.mm(hyper, x2.view(n * 16, c2).t()), h, w)

    def decode(
        self,
        sparse: torch.Tensor,
        which: list[int],
        iou_thresh: float,
        region: tuple[int, int] | None = None,
        then: Callable[[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], R] | None = None,
        part: int | None = None,
        cells: DenseCells | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | list[R]:
        """Decode prompts a couple at a time (their image tokens then stay in the CPU caches, much faster
        than batches) and upscale only those with a mask output whose IoU is above ``iou_thresh``.

        Returns IoU predictions ``B x K`` of outputs ``which`` (K of them), the kept candidates ``B x K`` bool
        (IoU > ``iou_thresh``; all when it is 0) and their low-res logits ``kept x 4h x 4w`` in row-major
        (prompt, output) order (``region`` as in :meth:`masks`).

        On the CPU the prompts are shared among up to ``torch.get_num_threads()`` worker threads (at most
        :data:`DECODE_WORKERS`), each running its operations on one core: the operations here are small,
        and with several threads per operation every one of them waits for the slowest thread, which on
        a busy machine (other processes on the cores) made decoding several times slower. Same results.

        ``then(start, (iou, keep, low))``: run by each worker on its part (prompts ``start :``, the three
        outputs as above for that part), so that the caller's own work on the outputs runs in parallel
        too; ``decode`` then returns the list of its results, in prompt order. ``part``: prompts per worker
        task (whole chunks of :data:`DECODE_CHUNK`), taken by the workers as they become free; by default
        one equal share per worker. ``cells``: the prompts' dense cells, for a model that draws clicks
        into its dense embedding (:meth:`embed_points`).
        """
        n = sparse.shape[0]
        step = part or -(-n // available_workers(sparse.device, DECODE_WORKERS))  # default: a share per worker
        step = max(1, -(-step // DECODE_CHUNK)) * DECODE_CHUNK  # whole chunks per task
        starts = range(0, max(n, 1), step)

        def task(start: int):
            part_cells = None if cells is None else cells[start : start + step]
            out = self._decode(sparse[start : start + step], which, iou_thresh, region, part_cells)
            return out if then is None else then(start, out)

        parts = map_on_workers(task, starts, sparse.device, DECODE_WORKERS)
        if then is not None:
            return parts
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def _decode(
        self,
        sparse: torch.Tensor,
        which: list[int],
        iou_thresh: float,
        region: tuple[int, int] | None,
        cells: DenseCells | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ious, keeps, lows = [], [], []
        for i in range(0, sparse.shape[0], DECODE_CHUNK):
            chunk_cells = None if cells is None else cells[i : i + DECODE_CHUNK]
            iou, mask_tokens, keys = self.tokens(sparse[i : i + DECODE_CHUNK], chunk_cells)
            iou = iou[:, which].float()
            keep = iou > iou_thresh if iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            ious.append(iou)
            keeps.append(keep)
            for j, row in enumerate(keep.tolist()):
                sel = [k for k, ok in zip(which, row) if ok]
                if sel:
                    x = keys if keys.batch == 1 else keys.select(j)
                    lows.append(self.masks(x, mask_tokens[j : j + 1], sel, region)[0])
        h, w = region or self.hw
        low = torch.cat(lows) if lows else sparse.new_zeros((0, 4 * h, 4 * w))
        return torch.cat(ious), torch.cat(keeps), low


D = TypeVar("D")


def per_image_decoder(
    owner: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, vec: torch.Tensor, make: Callable[[], D]
) -> D:
    """The re-associated decoder that ``owner`` (a fast mask decoder) made last, kept in its
    ``_reassociated_cache``, while the image embedding is the same tensor (unchanged since: same version;
    inference-mode tensors have no version counter, and the predictor never writes into its embedding) and
    the positional encoding and dense vector are equal; else ``make()``'s, kept for the next call."""
    version = None if image_embeddings.is_inference() else image_embeddings._version
    c = owner._reassociated_cache
    if (
        c is not None
        and c[0]() is image_embeddings
        and c[1] == version
        and (c[2] is image_pe or torch.equal(c[2], image_pe))
        and torch.equal(c[3], vec)
    ):
        return c[4]
    dec = make()
    owner._reassociated_cache = (weakref.ref(image_embeddings), version, image_pe, vec, dec)
    return dec


def upscaling_matrices(mask_decoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's two stride-2 2x2 transposed convolutions as matrices ``in x (dy, dx, out)`` and their
    biases repeated to match (every input pixel gives a 2x2 block of outputs): weight, bias, weight, bias."""
    up1, up2 = mask_decoder.output_upscaling[0], mask_decoder.output_upscaling[3]
    return tuple(  # type: ignore[return-value]
        t
        for up in (up1, up2)
        for t in (up.weight.permute(0, 2, 3, 1).reshape(up.in_channels, 4 * up.out_channels), up.bias.repeat(4))
    )


def upscale_rows(width: int, channels: int) -> int:
    """Image-token rows per band of the upscaling (:data:`UPSCALE_BAND_BYTES`) for a grid ``width`` tokens wide
    whose second transposed convolution has ``channels`` output channels (16 pixels a token, fp32)."""
    return max(1, UPSCALE_BAND_BYTES // (width * 16 * channels * 4))


def in_pixel_order(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The masks' products ``K x (h*w*16)`` laid out as the upscaling makes them, (y, x, dy, dx, ey, ex) for an
    ``h x w`` band of image tokens, as logits ``K x 4h x 4w`` (row ``4y + 2dy + ey``, column ``4x + 2dx + ex``)."""
    k = m.shape[0]
    return m.view(-1).index_select(0, _pixel_order(k, h, w, m.device)).view(k, 4 * h, 4 * w)


@functools.lru_cache(maxsize=8)  # a few shapes recur (an image's region, the generator's crops); each <= ~1.4 MB
def _pixel_order(k: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """:func:`in_pixel_order`'s source index of each pixel: one gather, several times faster than the copy of
    the 7-dimensional permutation it replaces (its innermost axes have 2 elements)."""
    order = torch.arange(k * h * w * 16, device=device).view(k, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return order.reshape(-1)
