"""SAM's mask decoder re-associated for one image and many prompts without a mask input.

Same function as :class:`~segany.modeling.mask_decoder.MaskDecoder` (outputs equal up to float rounding),
with the work ordered for the CPU: the prompt-independent image side of the first block is computed once
per image, attention between the 4096 image tokens and the few prompt tokens goes through the small side,
and prompts are decoded a couple at a time by one-core worker threads. The automatic mask generator uses
it for its point grid, and ``MaskDecoder`` itself for prompts without a mask input at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import LayerNorm2d, activate_, linear_act
from segany.modeling.transformer import TwoWayTransformer
from segany.modeling.workers import available_workers, map_on_workers, worker_pool

# Prompts decoded together: a couple at a time keeps their 64 x 64 x 256 image tokens (4 MB each) in the
# CPU caches through the transformer and the upscaling: measured 1.7x faster than batches of 64 (vit_b).
DECODE_CHUNK = 2
# Most threads that decode prompts side by side (each on one core; see ReassociatedDecoder.decode).
DECODE_WORKERS = 8


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``B x T x (H*d)`` -> ``B x H x T x d``."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``B x H x T x d`` -> ``B x T x (H*d)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _split_weight(lin: nn.Linear, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection ``C -> H*d`` as per-head ``H x d x C`` weights and ``H x d`` biases."""
    out, c = lin.weight.shape
    return lin.weight.view(n_heads, out // n_heads, c), lin.bias.view(n_heads, out // n_heads)


def _values_out(attn: nn.Module, v_tokens: torch.Tensor) -> torch.Tensor:
    """``out_proj`` applied to each head's value of each token: ``B x T x C`` -> ``B x (H*T) x C``.

    Image-to-token attention gives each image token a mix of the few token values per head; its output
    projection is linear, so projecting the values first and mixing after is the same sum. The output
    bias is folded in: each head's weights sum to one, so adding ``bias / H`` to every row adds ``bias``.
    """
    n_heads = attn.num_heads
    v = _heads(attn.v_proj(v_tokens), n_heads)  # B x H x T x d
    b, h, t, d = v.shape
    w_o = attn.out_proj.weight.view(-1, h, d)  # C x H x d
    u = torch.einsum("bhtd,chd->bhtc", v, w_o) + attn.out_proj.bias / h
    return u.reshape(b, h * t, -1)


class ReassociatedDecoder:
    """SAM's mask decoder for one image embedding and many prompts without a mask input, re-associated.

    Same function as :class:`~segany.modeling.mask_decoder.MaskDecoder` (outputs equal up to float
    rounding); the order of the work is what changes:

    * The first block's image side does not depend on the prompt (the image embedding plus the
      no-mask embedding): its projections are computed once per image, not once per prompt.
    * Attention between the ``N = 64*64`` image tokens and the ``T = 7`` prompt tokens goes through the
      small side. A projection ``W`` of every image token is replaced by ``W^T`` applied to the few
      head/token vectors: scores ``q . (W k + b) = (W^T q) . k + q . b``, and weighted sums
      ``sum_n a_n (W v_n + b) = W (sum_n a_n v_n) + b`` (the weights sum to one). With SAM's sizes that
      is ``heads x tokens = 56`` multiply-adds per image-token channel instead of 128 per projection.
    * Prompts go through a couple at a time (:data:`DECODE_CHUNK`), so that their image tokens stay in
      the CPU caches from the transformer to the upscaling.
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
        self.keys0 = (features + dense).flatten(2).transpose(1, 2)
        self.key_pe = image_pe.flatten(2).transpose(1, 2)
        first = tr.layers[0]
        k = self.keys0 + self.key_pe
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self.k0 = _heads(t2i.k_proj(k), t2i.num_heads)[0]  # H x N x d
        self.v0 = _heads(t2i.v_proj(self.keys0), t2i.num_heads)[0]
        self.q0 = _heads(i2t.q_proj(k), i2t.num_heads)[0]

    @classmethod
    def for_model(cls, model: nn.Module, features: torch.Tensor) -> ReassociatedDecoder:
        """The decoder of a :class:`~segany.modeling.sam.Sam` for prompts without a mask input."""
        pe = model.prompt_encoder
        return cls(model.mask_decoder, features, pe.no_mask_embed.weight[0], pe.get_dense_pe(), model.image_size)

    @staticmethod
    def supports(decoder: nn.Module) -> bool:
        """True for the standard SAM decoder (the layout this class re-associates); ``decoder`` is a
        ``MaskDecoder`` or a model that has one."""
        from segany.modeling.mask_decoder import MaskDecoder  # mask_decoder imports this module

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
        rows = low_res_rows(input_size[0], 4 * self.hw[0], self.image_size)
        cols = low_res_rows(input_size[1], 4 * self.hw[1], self.image_size)
        return -(-rows // 4), -(-cols // 4)  # 4 low-res pixels per image token

    # -- attention, token side: tokens attend to the image ----------------------------------------------

    def _t2i_shared(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """Tokens (``B x T x C``) attend to the first block's prompt-independent image keys/values."""
        b, t, _ = q.shape
        qh = _heads(attn.q_proj(q), attn.num_heads)  # B x H x T x d
        h, d = qh.shape[1], qh.shape[3]
        qh = qh.transpose(0, 1).reshape(h, b * t, d) * d**-0.5  # the softmax scale, on the small side
        a = torch.bmm(qh, self.k0.transpose(1, 2)).softmax(-1)  # H x BT x N
        out = torch.bmm(a, self.v0).view(h, b, t, d).transpose(0, 1)  # B x H x T x d
        return attn.out_proj(_merge(out))

    @staticmethod
    def _t2i(attn: nn.Module, q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
        """Tokens (``B x T x C``) attend to per-prompt image tokens (``B x N x C``), through the token side."""
        b, t, c = q.shape
        qh = _heads(attn.q_proj(q), attn.num_heads)  # B x H x T x d
        h, d = qh.shape[1], qh.shape[3]
        w_k, b_k = _split_weight(attn.k_proj, h)
        qh = qh * d**-0.5  # the softmax scale, on the small side
        q_back = torch.einsum("bhtd,hdc->bhtc", qh, w_k).reshape(b, h * t, c)
        q_bias = (qh * b_k[None, :, None, :]).sum(-1).reshape(b, h * t, 1)
        a = torch.baddbmm(q_bias, q_back, k_img.transpose(1, 2)).softmax(-1)  # B x HT x N
        mixed = torch.bmm(a, v_img).view(b, h, t, c)  # attention-weighted image tokens, per head
        w_v, b_v = _split_weight(attn.v_proj, h)
        out = torch.einsum("bhtc,hdc->bhtd", mixed, w_v) + b_v[None, :, None, :]
        return attn.out_proj(_merge(out))

    # -- attention, image side: image tokens attend to the tokens ----------------------------------------

    def _i2t_shared(self, attn: nn.Module, k_tok: torch.Tensor, v_tok: torch.Tensor) -> torch.Tensor:
        """The first block's image tokens attend to the tokens: ``keys0 + attention`` (``B x N x C``)."""
        kh = _heads(attn.k_proj(k_tok), attn.num_heads)  # B x H x T x d
        b, h, t, d = kh.shape
        n = self.q0.shape[1]
        kh = kh.transpose(0, 1).reshape(h, b * t, d) * d**-0.5  # the softmax scale, on the small side
        s = torch.bmm(kh, self.q0.transpose(1, 2))  # H x BT x N
        # Softmax over the T tokens of each head; N innermost keeps the kernel vectorised.
        a = s.view(h, b, t, n).softmax(2).transpose(0, 1).reshape(b, h * t, n)
        return torch.baddbmm(self.keys0.expand(b, -1, -1), a.transpose(1, 2), _values_out(attn, v_tok))

    @staticmethod
    def _i2t(
        attn: nn.Module, keys: torch.Tensor, k_img: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor
    ) -> torch.Tensor:
        """Per-prompt image tokens (``B x N x C``, ``k_img`` with the positional encoding) attend to the
        tokens, through the token side: ``keys + attention`` (in place in ``keys`` without autograd: it
        is the caller's own tensor, and the update then costs one pass over it instead of two)."""
        kh = _heads(attn.k_proj(k_tok), attn.num_heads)  # B x H x T x d
        b, h, t, d = kh.shape
        n, c = k_img.shape[1], k_img.shape[2]
        kh = kh * d**-0.5  # the softmax scale, on the small side
        w_q, b_q = _split_weight(attn.q_proj, h)
        k_back = torch.einsum("bhtd,hdc->bhtc", kh, w_q).reshape(b, h * t, c)
        k_bias = (kh * b_q[None, :, None, :]).sum(-1).reshape(b, h * t, 1)
        s = torch.baddbmm(k_bias, k_back, k_img.transpose(1, 2))  # B x HT x N
        a = s.view(b, h, t, n).softmax(2).view(b, h * t, n)
        if torch.is_grad_enabled():
            return torch.baddbmm(keys, a.transpose(1, 2), _values_out(attn, v_tok))
        return keys.baddbmm_(a.transpose(1, 2), _values_out(attn, v_tok))

    # -- the decoder ------------------------------------------------------------------------------------

    def tokens(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse prompt embeddings ``B x T' x C`` -> IoU predictions ``B x M``, mask tokens ``B x M x C``,
        and the image tokens ``B x N x C`` after the transformer."""
        md, tr = self.md, self.tr
        b = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        qpe = torch.cat([out_tokens[None].expand(b, -1, -1), sparse.to(out_tokens.dtype)], dim=1)
        queries = qpe
        keys: torch.Tensor | None = None  # None while the image tokens are still the shared ones
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + qpe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            q = queries + qpe
            if keys is None:
                queries = layer.norm2(queries + self._t2i_shared(layer.cross_attn_token_to_image, q))
            else:
                k = keys + self.key_pe
                queries = layer.norm2(queries + self._t2i(layer.cross_attn_token_to_image, q, k, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + qpe
            if keys is None:
                keys = layer.norm4(self._i2t_shared(layer.cross_attn_image_to_token, q, queries))
            else:
                keys = layer.norm4(self._i2t(layer.cross_attn_image_to_token, keys, k, q, queries))
        q = queries + qpe
        k = keys + self.key_pe
        queries = tr.norm_final_attn(queries + self._t2i(tr.final_attn_token_to_image, q, k, keys))
        iou = md.iou_prediction_head(queries[:, 0])
        return iou, queries[:, 1 : 1 + md.num_mask_tokens], keys

    def masks(
        self, keys: torch.Tensor, mask_tokens: torch.Tensor, which: list[int], region: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Low-res mask logits ``B x len(which) x 4h x 4w`` of mask outputs ``which`` (image tokens ``keys``
        ``B x N x C`` and mask tokens ``B x M x C`` from :meth:`tokens`).

        ``region=(h, w)``: only the top-left ``h x w`` image tokens (the upscaling works pixel by pixel, so
        the logits there are the same), giving ``4h x 4w`` logits.
        """
        md = self.md
        b = keys.shape[0]
        h, w = region or self.hw
        grid = keys.view(b, self.hw[0], self.hw[1], -1)
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in which], dim=1)
        workers = min(available_workers(keys.device), h)
        if workers <= 1:
            return self._upscale(grid[:, :h, :w], hyper)
        # Rows of image tokens on one-core workers: the upscaling works pixel by pixel.
        out = keys.new_empty(b, len(which), 4 * h, 4 * w)
        step = -(-h // workers)

        def part(r0: int) -> None:
            out[:, :, 4 * r0 : 4 * (r0 + step)] = self._upscale(grid[:, r0 : min(r0 + step, h), :w], hyper)

        map_on_workers(part, range(0, h, step), keys.device)
        return out

    def _upscale(self, tokens: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Image tokens ``B x h x w x C`` and hypernetwork outputs ``B x K x C/8`` -> logits ``B x K x 4h x 4w``.

        The upscaling runs channels-last: each stride-2 transposed convolution is one matmul (bias and
        GELU fused at inference), the layer norm is the fused kernel."""
        up1, norm, act1, up2, act2 = self.md.output_upscaling
        b, h, w, _ = tokens.shape
        n, k = h * w, hyper.shape[1]
        c1, c2 = up1.out_channels, up2.out_channels
        # Stride-2 2x2 transposed convolutions: every input pixel gives a 2x2 block, (dy, dx, channel) last.
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * c1)
        x = linear_act(tokens.reshape(b * n, -1), w1, up1.bias.repeat(4), None).view(b, n, 4, c1)
        x = activate_(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps), act1)
        w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = linear_act(x.view(b * n * 4, c1), w2, up2.bias.repeat(4), act2)
        m = torch.bmm(x.view(b, n * 16, c2), hyper.transpose(1, 2))  # B x (y x dy dx ey ex) x K
        m = m.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, k, 4 * h, 4 * w)

    def decode(
        self, sparse: torch.Tensor, which: list[int], iou_thresh: float, region: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode prompts a couple at a time (their image tokens then stay in the CPU caches, much faster
        than batches) and upscale only those with a mask output whose IoU is above ``iou_thresh``.

        Returns IoU predictions ``B x K`` of outputs ``which`` (K of them), the kept candidates ``B x K`` bool
        (IoU > ``iou_thresh``; all when it is 0) and their low-res logits ``kept x 4h x 4w`` in row-major
        (prompt, output) order (``region`` as in :meth:`masks`).

        On the CPU the prompts are shared among up to ``torch.get_num_threads()`` worker threads (at most
        :data:`DECODE_WORKERS`), each running its operations on one core: the operations here are small,
        and with several threads per operation every one of them waits for the slowest thread, which on
        a busy machine (other processes on the cores) made decoding several times slower. Same results.
        """
        n = sparse.shape[0]
        workers = min(available_workers(sparse.device, DECODE_WORKERS), -(-n // DECODE_CHUNK))
        if workers <= 1:
            return self._decode(sparse, which, iou_thresh, region)
        step = -(-n // workers)
        step = -(-step // DECODE_CHUNK) * DECODE_CHUNK  # whole chunks per worker
        grad = torch.is_grad_enabled()

        def part(start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.inference_mode(), torch.set_grad_enabled(grad):
                return self._decode(sparse[start : start + step], which, iou_thresh, region)

        threads = torch.get_num_threads()
        try:
            parts = list(worker_pool(workers).map(part, range(0, n, step)))
        finally:
            torch.set_num_threads(threads)  # a new worker's setting also wrote torch's process-wide default
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def _decode(
        self, sparse: torch.Tensor, which: list[int], iou_thresh: float, region: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ious, keeps, lows = [], [], []
        for i in range(0, sparse.shape[0], DECODE_CHUNK):
            iou, mask_tokens, keys = self.tokens(sparse[i : i + DECODE_CHUNK])
            iou = iou[:, which].float()
            keep = iou > iou_thresh if iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            ious.append(iou)
            keeps.append(keep)
            for j, row in enumerate(keep.tolist()):
                sel = [k for k, ok in zip(which, row) if ok]
                if sel:
                    lows.append(self.masks(keys[j : j + 1], mask_tokens[j : j + 1], sel, region)[0])
        h, w = region or self.hw
        low = torch.cat(lows) if lows else sparse.new_zeros((0, 4 * h, 4 * w))
        return torch.cat(ious), torch.cat(keeps), low


def low_res_rows(input_len: int, low_len: int, image_size: int) -> int:
    """Rows (or columns) of low-res logits that the official post-processing reads for an input of
    ``input_len`` pixels: upsampling by ``f = image_size / low_len`` (bilinear, half-pixel centres) and
    cropping to ``input_len`` uses source rows up to ``floor((input_len - 0.5) / f - 0.5) + 1``."""
    f = image_size / low_len
    return min(low_len, math.floor((input_len - 0.5) / f - 0.5) + 2)
