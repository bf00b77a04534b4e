"""SamAutomaticMaskGenerator: "segment everything" from a grid of point prompts.

Same arguments, defaults, records and results as the official generator. It is faster because the
work is ordered differently, not approximated:

* the mask decoder is re-associated for "one image, many one-point prompts" (:class:`_PointGridDecoder`):
  the prompt-independent image side of its first block is computed once per image, attention between
  the 4096 image tokens and the 7 prompt tokens goes through the small side, and prompts are decoded a
  couple at a time so that their image tokens stay in the CPU caches, by worker threads that run on one
  core each (robust on a busy machine, where multi-threaded small operations stall);
* candidates are filtered by predicted IoU before anything is upscaled: prompts none of whose masks
  pass are never upscaled, and only the survivors are upsampled to full size (the official code
  upsamples every candidate first);
* the upscaling and the upsampling skip the part of the low-res map that lies in the input padding
  (the official post-processing crops it away), e.g. a third of the work for a 3:2 image;
* masks are kept as compressed COCO RLE (pycocotools, C) rather than Python run lists.

The model's own decoder (``fast_decoder = False``) is used for decoders of another layout.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from segany.errors import SegAnyError
from segany.modeling.common import LayerNorm2d
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.sam import Sam
from segany.modeling.transformer import TwoWayTransformer
from segany.predictor import SamPredictor
from segany.utils.masks import (
    batch_iterator,
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_points,
)

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]

# Candidates upsampled to full size at once: bounds peak memory (each is an H x W float map).
UPSAMPLE_CHUNK = 16
# Prompts decoded together: a couple at a time keeps their 64 x 64 x 256 image tokens (4 MB each) in the
# CPU caches through the transformer and the upscaling: measured 1.7x faster than batches of 64 (vit_b).
DECODE_CHUNK = 2
# Most threads that decode prompts side by side (each on one core; see _PointGridDecoder.decode).
DECODE_WORKERS = 8


@dataclass
class _Masks:
    """Candidate masks of one crop or image: compressed RLEs (in the full image frame) and their data."""

    rles: list[dict[str, Any]] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)  # XYXY, full image frame
    iou_preds: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor] = field(default_factory=list)
    crop_boxes: list[torch.Tensor] = field(default_factory=list)

    def cat(self) -> dict[str, Any]:
        def c(xs: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(xs) if xs else torch.zeros(shape, dtype=dtype)

        return {
            "rles": self.rles,
            "boxes": c(self.boxes, (0, 4), torch.int64),
            "iou_preds": c(self.iou_preds, (0,), torch.float32),
            "stability": c(self.stability, (0,), torch.float32),
            "points": c(self.points, (0, 2), torch.float64),
            "crop_boxes": c(self.crop_boxes, (0, 4), torch.int64),
        }


def _filter(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    idx = keep.tolist() if keep.dtype != torch.bool else torch.nonzero(keep).flatten().tolist()
    out = {k: v[keep] for k, v in data.items() if isinstance(v, torch.Tensor)}
    out["rles"] = [data["rles"][i] for i in idx]
    return out


def _encode(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``N x H x W`` bool -> compressed RLEs (pycocotools' native form, bytes counts)."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    return mask_utils.encode(arr)


# -- the mask decoder, re-associated for a point grid --------------------------------------------------


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


class _PointGridDecoder:
    """SAM's mask decoder for one image embedding and many single-point prompts, re-associated.

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

    def __init__(self, model: Sam, features: torch.Tensor) -> None:
        self.md = md = model.mask_decoder
        self.tr = tr = md.transformer
        pe = model.prompt_encoder
        self.hw = tuple(features.shape[-2:])
        self.image_size = model.image_size
        self.keys0 = (features + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        self.key_pe = pe.get_dense_pe().flatten(2).transpose(1, 2)
        first = tr.layers[0]
        k = self.keys0 + self.key_pe
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self.k0 = _heads(t2i.k_proj(k), t2i.num_heads)[0]  # H x N x d
        self.v0 = _heads(t2i.v_proj(self.keys0), t2i.num_heads)[0]
        self.q0 = _heads(i2t.q_proj(k), i2t.num_heads)[0]

    @staticmethod
    def supports(model: Sam) -> bool:
        """True for the standard SAM decoder (the layout this class re-associates)."""
        md = model.mask_decoder
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
        rows = _low_res_rows(input_size[0], 4 * self.hw[0], self.image_size)
        cols = _low_res_rows(input_size[1], 4 * self.hw[1], self.image_size)
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
        tokens, through the token side: ``keys + attention``."""
        kh = _heads(attn.k_proj(k_tok), attn.num_heads)  # B x H x T x d
        b, h, t, d = kh.shape
        n, c = k_img.shape[1], k_img.shape[2]
        kh = kh * d**-0.5  # the softmax scale, on the small side
        w_q, b_q = _split_weight(attn.q_proj, h)
        k_back = torch.einsum("bhtd,hdc->bhtc", kh, w_q).reshape(b, h * t, c)
        k_bias = (kh * b_q[None, :, None, :]).sum(-1).reshape(b, h * t, 1)
        s = torch.baddbmm(k_bias, k_back, k_img.transpose(1, 2))  # B x HT x N
        a = s.view(b, h, t, n).softmax(2).view(b, h * t, n)
        return torch.baddbmm(keys, a.transpose(1, 2), _values_out(attn, v_tok))

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
        up1, norm, act1, up2, act2 = md.output_upscaling
        b = keys.shape[0]
        h, w = region or self.hw
        if (h, w) != tuple(self.hw):
            keys = keys.view(b, self.hw[0], self.hw[1], -1)[:, :h, :w]
        n = h * w
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in which], dim=1)
        c1, c2 = up1.out_channels, up2.out_channels
        # Stride-2 2x2 transposed convolutions: every input pixel gives a 2x2 block, (dy, dx, channel) last.
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * c1)
        x = torch.addmm(up1.bias.repeat(4), keys.reshape(b * n, -1), w1).view(b, n, 4, c1)
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = act2(torch.addmm(up2.bias.repeat(4), x.view(b * n * 4, c1), w2))
        m = torch.bmm(x.view(b, n * 16, c2), hyper.transpose(1, 2))  # B x (y x dy dx ey ex) x K
        m = m.view(b, h, w, 2, 2, 2, 2, len(which)).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, len(which), 4 * h, 4 * w)

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
        workers = min(torch.get_num_threads(), DECODE_WORKERS, -(-n // DECODE_CHUNK))
        if workers <= 1 or sparse.device.type != "cpu":
            return self._decode(sparse, which, iou_thresh, region)
        step = -(-n // workers)
        step = -(-step // DECODE_CHUNK) * DECODE_CHUNK  # whole chunks per worker
        grad = torch.is_grad_enabled()

        def part(start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.inference_mode(), torch.set_grad_enabled(grad):
                return self._decode(sparse[start : start + step], which, iou_thresh, region)

        threads = torch.get_num_threads()
        try:
            parts = list(_worker_pool(workers).map(part, range(0, n, step)))
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


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _one_thread() -> None:
    # OpenMP's and MKL's thread counts belong to the calling thread. torch sets a thread's count from its
    # process-wide default the first time the thread runs an operation: do that first, then set one.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A lasting pool of ``workers`` threads that run torch operations on one core each."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, "segany-decode", initializer=_one_thread)
        return pool


def _low_res_rows(input_len: int, low_len: int, image_size: int) -> int:
    """Rows (or columns) of low-res logits that the official post-processing reads for an input of
    ``input_len`` pixels: upsampling by ``f = image_size / low_len`` (bilinear, half-pixel centres) and
    cropping to ``input_len`` uses source rows up to ``floor((input_len - 0.5) / f - 0.5) + 1``."""
    f = image_size / low_len
    return min(low_len, math.floor((input_len - 0.5) / f - 0.5) + 2)


def _upsample(
    low: torch.Tensor, model: Sam, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """``model.postprocess_masks`` for ``K x h x w`` low-res logits that may be only the top-left part of
    the full ``L x L`` low-res map (enough rows and columns for the input, see :func:`_low_res_rows`):
    the same exact-factor upsampling, the same crop, the same resize, without the padding's pixels."""
    f = model.image_size // model.prompt_encoder.mask_input_size[0]
    x = F.interpolate(low[:, None], (low.shape[-2] * f, low.shape[-1] * f), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image from a point grid, with the official filters.

    Args (the official ones, same defaults):
        model: a :class:`Sam`.
        points_per_side: grid density (``points_per_side**2`` prompts); None requires ``point_grids``.
        points_per_batch: prompts run through the decoder at once.
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh / stability_score_offset: keep masks that change little when the
            logit threshold moves by the offset.
        box_nms_thresh: box IoU for NMS within a crop.
        crop_n_layers, crop_nms_thresh, crop_overlap_ratio, crop_n_points_downscale_factor: zoomed
            crops (layer i has 2**i x 2**i crops) and the NMS across them.
        point_grids: explicit normalized grids, one per crop layer.
        min_mask_region_area: fill holes and remove islands smaller than this (pixels).
        output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".
    Extra:
        max_mask_region_fraction: drop masks covering more than this fraction of the image (the
            SA-1B filter uses 0.95); None keeps them, as the official generator.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: OutputMode = "binary_mask",
        max_mask_region_fraction: float | None = None,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise SegAnyError("exactly one of points_per_side or point_grids must be given")
        if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
            raise SegAnyError(f"unknown output_mode {output_mode!r}")
        if points_per_batch < 1:
            raise SegAnyError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise SegAnyError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if crop_n_points_downscale_factor < 1:
            raise SegAnyError(f"crop_n_points_downscale_factor must be >= 1, got {crop_n_points_downscale_factor}")
        for name, v in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
        ):
            if not 0.0 <= v <= 1.0:
                raise SegAnyError(f"{name} must be in [0, 1], got {v}")
        if not stability_score_offset >= 0.0:
            raise SegAnyError(f"stability_score_offset must be >= 0, got {stability_score_offset}")
        if not 0.0 <= crop_overlap_ratio < 1.0:
            raise SegAnyError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio}")
        if min_mask_region_area < 0:
            raise SegAnyError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        if max_mask_region_fraction is not None and not 0.0 < max_mask_region_fraction <= 1.0:
            raise SegAnyError(f"max_mask_region_fraction must be in (0, 1], got {max_mask_region_fraction}")
        if points_per_side is not None:
            if points_per_side < 1:
                raise SegAnyError(f"points_per_side must be >= 1, got {points_per_side}")
            if points_per_side // crop_n_points_downscale_factor**crop_n_layers < 1:
                raise SegAnyError(
                    f"points_per_side {points_per_side} leaves no points in crop layer {crop_n_layers} "
                    f"(downscale factor {crop_n_points_downscale_factor})"
                )
            point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            if len(point_grids) != crop_n_layers + 1:
                raise SegAnyError(f"point_grids must hold crop_n_layers + 1 = {crop_n_layers + 1} grids")
            point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            for i, g in enumerate(point_grids):
                if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
                    raise SegAnyError(f"point_grids[{i}] must be N x 2 normalized (x, y) points, got {g.shape}")
        self.predictor = SamPredictor(model)
        self.point_grids = point_grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.max_mask_region_fraction = max_mask_region_fraction
        # The re-associated decoder (same results, less work); the model's own decoder otherwise.
        self.fast_decoder = _PointGridDecoder.supports(model)

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an ``H x W x 3`` uint8 RGB image, as the official list of records.

        Each record: segmentation (per output_mode), area, bbox (XYWH), predicted_iou, point_coords
        ([[x, y]]), stability_score, crop_box (XYWH).
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegAnyError(f"image must be an H x W x 3 uint8 array, got {getattr(image, 'shape', None)}")
        data = self._generate_masks(image)
        h, w = image.shape[:2]
        if self.min_mask_region_area > 0 and data["rles"]:
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        # One RLE at a time: pycocotools' list form of area() overflows past 255 masks with NumPy 2.
        areas = [int(mask_utils.area(r)) for r in data["rles"]]
        if self.max_mask_region_fraction is not None and areas:
            keep = torch.tensor([a <= self.max_mask_region_fraction * h * w for a in areas])
            data = _filter(data, keep)
            areas = [a for a, k in zip(areas, keep.tolist()) if k]
        return self._records(data, areas)

    def _records(self, data: dict[str, Any], areas: list[int]) -> list[dict[str, Any]]:
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segs: list[Any] = [{"size": list(r["size"]), "counts": r["counts"].decode("utf-8")} for r in rles]
        elif self.output_mode == "binary_mask":
            segs = [m.astype(bool) for m in np.moveaxis(mask_utils.decode(rles), -1, 0)] if rles else []
        else:
            segs = []
            for r in rles:
                m = torch.from_numpy(mask_utils.decode(r).astype(bool))[None]
                segs.append(mask_to_rle_pytorch(m)[0])
        boxes = box_xyxy_to_xywh(data["boxes"]).tolist()
        crop_boxes = box_xyxy_to_xywh(data["crop_boxes"]).tolist()
        return [
            {
                "segmentation": segs[i],
                "area": areas[i],
                "bbox": boxes[i],
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability"][i]),
                "crop_box": crop_boxes[i],
            }
            for i in range(len(rles))
        ]

    def _generate_masks(self, image: np.ndarray) -> dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        acc = _Masks()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            crop = self._process_crop(image, crop_box, layer_idx, orig_size)
            acc.rles += crop["rles"]
            for name in ("boxes", "iou_preds", "stability", "points", "crop_boxes"):
                getattr(acc, name).append(crop[name])
        data = acc.cat()
        if len(crop_boxes) > 1 and data["rles"]:
            # Prefer masks from smaller crops (zoomed in, finer), as the official generator.
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(
                data["boxes"].float(), scores, torch.zeros_like(data["boxes"][:, 0]), self.crop_nms_thresh
            )
            data = _filter(data, keep)
        return data

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer_idx: int, orig_size: tuple[int, int]
    ) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        cropped_size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        decoder = _PointGridDecoder(self.predictor.model, self.predictor.features) if self.fast_decoder else None
        points_scale = np.array(cropped_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        acc = _Masks()
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            batch = self._process_batch(points, cropped_size, crop_box, orig_size, decoder)
            acc.rles += batch["rles"]
            for name in ("boxes", "iou_preds", "stability", "points"):
                getattr(acc, name).append(batch[name])
        self.predictor.reset_image()
        data = acc.cat()
        del data["crop_boxes"]  # set below, once the crop's masks are known
        if not data["rles"]:
            data["crop_boxes"] = torch.zeros((0, 4), dtype=torch.int64)
            return data
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), self.box_nms_thresh
        )
        data = _filter(data, keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.int64)
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, int],
        crop_box: list[int],
        orig_size: tuple[int, int],
        decoder: _PointGridDecoder | None = None,
    ) -> dict[str, Any]:
        orig_h, orig_w = orig_size
        p = self.predictor
        in_points = torch.as_tensor(p.transform.apply_coords(points, im_size), dtype=torch.float, device=p.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=p.device)
        # Decoder only: low-res logits, not yet upsampled, and only for candidates that pass the IoU filter.
        prompt = (in_points[:, None, :], in_labels[:, None])
        sparse, dense = p.model.prompt_encoder(points=prompt, boxes=None, masks=None)
        if decoder is not None:
            which = list(range(1, decoder.md.num_mask_tokens))  # the multimask outputs
            region = decoder.region(p.input_size)
            iou_preds, keep, low_res = decoder.decode(sparse, which, self.pred_iou_thresh, region)
        else:
            low_res, iou_preds = p.model.mask_decoder(
                p.features, p.model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True
            )
        n_out = iou_preds.shape[1]
        iou_preds = iou_preds.flatten(0, 1).float()
        # float64 points, as the official generator (the records carry these exact values).
        pts = torch.as_tensor(points, dtype=torch.float64).repeat_interleave(n_out, dim=0)
        if decoder is None:
            keep = iou_preds > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou_preds).bool()
            idx = torch.nonzero(keep).flatten()
            low_res = low_res.flatten(0, 1)[idx]
        else:
            idx = torch.nonzero(keep.flatten()).flatten()
        rles: list[dict[str, Any]] = []
        boxes, ious, stabs, kept_pts = [], [], [], []
        thr = p.model.mask_threshold
        for start in range(0, len(idx), UPSAMPLE_CHUNK):
            sel = idx[start : start + UPSAMPLE_CHUNK]
            chunk = low_res[start : start + UPSAMPLE_CHUNK]
            logits = _upsample(chunk, p.model, p.input_size, p.original_size)
            stab = calculate_stability_score(logits, thr, self.stability_score_offset)
            ok = stab >= self.stability_score_thresh
            if self.stability_score_thresh <= 0.0:  # off, as the official generator (keeps NaN scores too)
                ok = torch.ones_like(stab).bool()
            if not ok.any():
                continue
            masks = logits[ok] > thr
            bxs = batched_mask_to_box(masks)
            ok2 = ~is_box_near_crop_edge(bxs, crop_box, [0, 0, orig_w, orig_h])
            if not ok2.any():
                continue
            masks, bxs = masks[ok2], bxs[ok2]
            sel_ok = sel[ok][ok2]
            rles += self._encode_uncropped(masks, crop_box, orig_h, orig_w)
            boxes.append(bxs.cpu())
            ious.append(iou_preds[sel_ok].cpu())
            stabs.append(stab[ok][ok2].float().cpu())
            kept_pts.append(pts[sel_ok.cpu()])
        return {
            "rles": rles,
            "boxes": torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=torch.int64),
            "iou_preds": torch.cat(ious) if ious else torch.zeros(0),
            "stability": torch.cat(stabs) if stabs else torch.zeros(0),
            "points": torch.cat(kept_pts) if kept_pts else torch.zeros((0, 2), dtype=torch.float64),
        }

    @staticmethod
    def _encode_uncropped(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> list[dict]:
        """Encode crop-frame masks as RLEs of the full image (padding with background)."""
        x0, y0, x1, y1 = crop_box
        if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
            return _encode(masks)
        full = torch.zeros((masks.shape[0], orig_h, orig_w), dtype=torch.bool)
        full[:, y0:y1, x0:x1] = masks.cpu()
        return _encode(full)

    @staticmethod
    def _postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float) -> dict[str, Any]:
        """Fill small holes and drop small islands, then NMS that prefers masks that needed no change."""
        new_masks, scores = [], []
        for rle in data["rles"]:
            mask = mask_utils.decode(rle).astype(bool)
            mask, changed = remove_small_regions(mask, min_area, "holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, min_area, "islands")
            unchanged = unchanged and not changed
            new_masks.append(torch.as_tensor(mask)[None])
            scores.append(float(unchanged))
        masks = torch.cat(new_masks)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros_like(boxes[:, 0]), nms_thresh)
        data = dict(data)
        rles = list(data["rles"])
        data["boxes"] = data["boxes"].clone()
        for i in keep.tolist():
            if scores[i] == 0.0:
                rles[i] = _encode(masks[i][None])[0]
                data["boxes"][i] = boxes[i]
        data["rles"] = rles
        return _filter(data, keep)
