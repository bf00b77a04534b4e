"""Zoom-in for interactive prompts: predict on a crop around the object instead of the whole picture.

RITM's "ZoomIn" (Sofiiuk et al., "Reviving Iterative Training with Mask Guidance for Interactive
Segmentation", 2021), which its published click figures use: once a prediction exists, the image is
cropped to the box around that mask and every click so far, widened by ``expand``, and the crop is encoded
at the model's full input size, so the low-resolution mask grid covers the object instead of the whole
picture. The first click's answer is refined the same way (``refine_first``) and a box is answered on a
crop around it (``zoom_box``). Small objects and boundaries gain most; the price is an image embedding
for each first click or box and whenever the crop moves (MODELS.md has the figures).

:class:`ZoomInPredictor` wraps a :class:`~segany.predictor.SamPredictor` and keeps its ``set_image`` /
``predict`` API, so the evaluation protocols and any SAM click loop run unchanged. A caller that keeps no
predictor between calls (the server) rebuilds one from the whole image's cached embedding
(:meth:`ZoomInPredictor.set_embedding`), hands back the previous answer's crop and logits
(:meth:`ZoomInPredictor.remember`) and may keep the crops' embeddings in its own bounded cache
(``crop_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from segany.errors import SegAnyError
from segany.modeling.point_refiner import RefinerImage
from segany.predictor import SamPredictor
from segany.prompts import check_prompts
from segany.transforms import get_preprocess_shape
from segany.utils.masks import box_iou

#: logit given to pixels outside the crop (the crop holds the previous mask and every click, widened)
OUTSIDE_LOGIT = -20.0

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
#: a crop's embedding, original and input sizes, decoder inputs and what a point refiner reads (None: no refiner)
CropEmbedding = tuple[torch.Tensor, tuple[int, int], tuple[int, int], dict[str, Any], RefinerImage | None]


class CropCache(Protocol):
    """Where crops' embeddings are kept between calls (the server's is byte-bounded)."""

    def get(self, crop: Box) -> CropEmbedding | None: ...

    def put(self, crop: Box, value: CropEmbedding) -> None: ...


class ZoomInPredictor:
    """A :class:`SamPredictor` that answers clicks and boxes on a crop around the object.

    Args:
        predictor: the predictor to wrap (its image is replaced by the crops as they are needed).
        skip_clicks: clicks answered on the whole image before zooming (1: the first click sees it all).
        expand: the crop is the box around the previous mask and every click, this many times wider and taller.
        min_side: the crop's smallest width and height, in image pixels.
        first_min_side: the same for the crop the first clicks are answered again on (``refine_first``): a
            first answer on a small object gains from more of its surroundings than a correction does
            (MODELS.md, "Zoom-in's first crop and its boxes").
        recompute_iou: the crop is kept while the new box overlaps it by at least this IoU and holds every
            click (RITM's rule: fewer embeddings, steadier crops).
        box_min_zoom: a box is answered on its crop only where the crop enlarges the picture at least this many
            times more than the whole image's input does, else on the whole image: a crop that barely enlarges
            the object only takes its surroundings away (0: always on the crop; MODELS.md, "Zoom-in's first
            crop and its boxes").
        refine_first: the first clicks' answer (at most ``skip_clicks`` points, no box, no ``mask_input``) is
            predicted again on a crop around the best whole-image mask, with that mask as the prompt: one
            mask, whatever ``multimask_output``, for one more embedding.
        zoom_box: a box (with any clicks) is answered on a crop around it, widened by ``expand`` (unless it
            comes with a ``mask_input`` that is not one of ours: the whole image then).
        crop_cache: optional store of crops' embeddings (``get`` / ``put`` by crop box), for callers that
            rebuild the predictor at each call.

    The previous prediction is the mask whose low-res logits the caller sends back as ``mask_input`` (SAM's
    click loop); those logits may be in a crop's frame, so the wrapper maps its own full-resolution copy of
    that mask into the next crop. Calls with no previous mask or with at most ``skip_clicks`` points are
    answered on the whole image, exactly as the wrapped predictor answers them (and then, for the first
    clicks with ``refine_first``, once more on a crop); so are boxes without ``zoom_box``.
    """

    def __init__(
        self,
        predictor: SamPredictor,
        skip_clicks: int = 1,
        expand: float = 2.0,
        min_side: int = 100,
        first_min_side: int = 160,
        recompute_iou: float = 0.5,
        box_min_zoom: float = 3.0,
        refine_first: bool = True,
        zoom_box: bool = True,
        crop_cache: CropCache | None = None,
    ) -> None:
        if (
            skip_clicks < 1 or expand < 1 or min(min_side, first_min_side) < 1 or not 0 <= recompute_iou <= 1
            or not box_min_zoom >= 0
        ):
            raise ValueError(
                "ZoomInPredictor needs skip_clicks >= 1, expand >= 1, min_side and first_min_side >= 1, "
                "recompute_iou in [0, 1], box_min_zoom >= 0"
            )
        self.predictor = predictor
        self.skip_clicks, self.expand, self.recompute_iou = skip_clicks, expand, recompute_iou
        self.min_side, self.first_min_side, self.box_min_zoom = min_side, first_min_side, box_min_zoom
        self.refine_first, self.zoom_box, self.crop_cache = refine_first, zoom_box, crop_cache
        self._hw: tuple[int, int] | None = None  # the whole image's height and width
        # the whole image as RGB pixels, or the function that decodes them when a crop first needs them
        self._pixels: np.ndarray | Callable[[], np.ndarray] | None = None
        self._crop: Box | None = None  # the crop the wrapped predictor holds now
        self._whole: tuple | None = None  # the whole image's embedding, original and input sizes, decoder inputs
        self._last: tuple[Box, np.ndarray, np.ndarray] | None = None  # crop, low-res C x s x s, logits C x H x W

    @property
    def model(self) -> Any:
        """The wrapped predictor's model, on the grid of the crop it holds (``config.max_image_size``)."""
        return self.predictor.model

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Set the whole image (``H x W x 3`` uint8) and forget the previous prediction."""
        self.predictor.set_image(image, image_format)
        self._keep_whole(np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image))  # crops: RGB

    def set_embedding(
        self,
        embedding: torch.Tensor,
        original_size: tuple[int, int],
        image: np.ndarray | Callable[[], np.ndarray],
        input_size: tuple[int, int] | None = None,
        decoder_inputs: dict[str, Any] | None = None,
        refiner_image: RefinerImage | None = None,
    ) -> None:
        """Set the whole image from its cached embedding, as :meth:`SamPredictor.set_embedding`; ``image``:
        its pixels (``H x W x 3`` uint8 RGB) or a function returning them, called only when a crop must be
        embedded (a server keeps the encoded upload, and a click on a kept crop needs no decoding).
        Forgets the previous prediction."""
        self.predictor.set_embedding(
            embedding, original_size, input_size, decoder_inputs=decoder_inputs, refiner_image=refiner_image
        )
        self._keep_whole(image)

    def _keep_whole(self, image: np.ndarray | Callable[[], np.ndarray]) -> None:
        p = self.predictor  # its whole-image embedding is kept: each object's first click comes back to it
        self._whole = _held(p)
        self._hw, self._pixels = p.original_size, image
        self._crop = self.full_box
        self._last = None

    @property
    def image(self) -> np.ndarray | None:
        """The whole image (``H x W x 3`` uint8 RGB), decoded on first use when it was given as a function."""
        if callable(self._pixels):
            self._pixels = np.ascontiguousarray(self._pixels())
        return self._pixels

    def remember(self, crop: Box, low_res_logits: np.ndarray) -> None:
        """Take ``low_res_logits`` (``C x s x s``, predicted on ``crop``: an earlier answer's :attr:`last_crop`)
        as the previous prediction, as if this predictor had made it; a ``mask_input`` equal to one of them
        then refines that mask."""
        if self._hw is None:
            raise SegAnyError("an image must be set before remember(...)")
        low = np.asarray(low_res_logits, dtype=np.float32)
        crop = tuple(int(v) for v in crop)
        if low.shape[-1] != self.model.prompt_encoder.mask_input_size[-1]:
            self._use(crop)  # predicted on another grid than the one held (max_image_size): the crop's
        self._last = (crop, low, paste_logits(self.model, low, crop, self._hw))

    @property
    def last_crop(self) -> Box | None:
        """The crop (``x0, y0, x1, y1``, pixels, end exclusive) the last answer was predicted on."""
        return None if self._last is None else self._last[0]

    @property
    def full_box(self) -> Box:
        assert self._hw is not None
        return (0, 0, self._hw[1], self._hw[0])

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`SamPredictor.predict`: masks (or logits) ``C x H x W`` in the whole image's frame, IoU
        predictions ``C`` and the low-res logits ``C x s x s`` of the frame they were predicted in."""
        if self._hw is None:
            raise SegAnyError("an image must be set with set_image(...) before predicting")
        # the prompts' checks first (one-line SegAnyError), before any crop arithmetic on them
        check_prompts(point_coords, point_labels, box, mask_input, self.model.prompt_encoder.mask_input_size)
        coords = None if point_coords is None else np.asarray(point_coords, dtype=np.float32)
        previous = self._previous(mask_input)
        n = 0 if coords is None else len(coords)
        if box is None and previous is not None and n > self.skip_clicks and (previous > 0).any():
            crop = self._next_crop(_with_box_of(previous > 0, coords), coords)
            return self._predict_on(crop, coords, point_labels, None, previous, multimask_output, return_logits)
        if box is not None and self.zoom_box and (mask_input is None or previous is not None):
            # a box: its crop, widened as a mask's box is (its corners and any clicks in it)
            b = np.asarray(box, dtype=np.float32).reshape(4)
            held = b.reshape(2, 2) if coords is None else np.concatenate([b.reshape(2, 2), coords])
            crop = self._box_crop(self._next_crop(held))  # a box is a new prompt: a new crop
            shift = np.array(crop[:2] * 2, dtype=np.float32)
            return self._predict_on(crop, coords, point_labels, b - shift, previous, multimask_output, return_logits)
        if previous is not None and self._last is not None and self._last[0] != self.full_box:
            mask_input = previous  # the caller's logits are in a crop's frame: ours, at full resolution
        whole = self._predict_on(self.full_box, coords, point_labels, box, mask_input, multimask_output, return_logits)
        if not self.refine_first or box is not None or mask_input is not None or not 0 < n <= self.skip_clicks:
            return whole  # exactly the wrapped predictor's answer
        # the first clicks: the best whole-image mask again, on a crop around it, with itself as the mask prompt
        best = self._last[2][int(np.argmax(whole[1]))]
        if not (best > 0).any():
            return whole
        crop = self._next_crop(_with_box_of(best > 0, coords), coords, self.first_min_side)
        return self._predict_on(crop, coords, point_labels, None, best, False, return_logits, first_prompt=True)

    def _predict_on(
        self,
        crop: Box,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask_output: bool,
        return_logits: bool,
        first_prompt: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The wrapped predictor's answer on ``crop`` (prompts in the whole image's frame; ``mask_input`` the
        caller's low-res logits in the crop's frame, or full-resolution logits ``H x W`` of the whole image,
        brought to the crop's grid once the predictor holds it: a crop's grid may differ from the whole
        image's with ``max_image_size``), pasted into the whole image; remembered as the previous prediction.
        ``first_prompt``: whether it answers the user's first prompt (None: where there is no mask input), which
        decides where its masks are cut (:meth:`SamPredictor.answer_threshold`)."""
        self._use(crop)
        if mask_input is not None and mask_input.shape == self._hw:
            mask_input = self._low_res(mask_input, crop)
        x0, y0, x1, y1 = crop
        shifted = None if coords is None else coords - np.array([x0, y0], dtype=np.float32)
        logits, scores, low = self.predictor.predict(
            shifted, labels, box, mask_input, multimask_output, return_logits=True
        )
        full = np.full((logits.shape[0], *self._hw), OUTSIDE_LOGIT, dtype=np.float32)
        full[:, y0:y1, x0:x1] = logits
        self._last = (crop, low, full)
        first = mask_input is None if first_prompt is None else first_prompt
        return (full if return_logits else full > self.predictor.answer_threshold(first)), scores, low

    # -- the previous mask and the crop ------------------------------------------------------------

    def _previous(self, mask_input: np.ndarray | None) -> np.ndarray | None:
        """Full-resolution logits (``H x W``) of the mask the caller sent back, if it is one of ours."""
        if mask_input is None or self._last is None:
            return None
        _, low, full = self._last
        sent = np.asarray(mask_input, dtype=np.float32)
        if sent.size != low[0].size:
            return None  # not one of ours; the wrapped predictor checks its shape
        sent = sent.reshape(low[0].shape)
        for k in range(low.shape[0]):
            if np.array_equal(sent, low[k]):
                return full[k]
        return None

    def _next_crop(self, points: np.ndarray, clicks: np.ndarray | None = None, min_side: int | None = None) -> Box:
        """The box around ``points`` (``N x 2`` pixel positions, x y), widened, at least ``min_side`` (None: the
        predictor's), inside the image; given the ``clicks``, the current crop instead while it still fits them
        (``recompute_iou``)."""
        h, w = self._hw
        min_side = self.min_side if min_side is None else min_side
        xs, ys = points[:, 0], points[:, 1]
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        bw = min(max((xs.max() + 1 - xs.min()) * self.expand, min_side), w)
        bh = min(max((ys.max() + 1 - ys.min()) * self.expand, min_side), h)
        x0 = int(np.clip(round(cx - bw / 2), 0, w - round(bw)))
        y0 = int(np.clip(round(cy - bh / 2), 0, h - round(bh)))
        new = (x0, y0, x0 + int(round(bw)), y0 + int(round(bh)))
        old = self.last_crop
        if (
            clicks is not None
            and old is not None
            and old != self.full_box
            and float(box_iou(torch.tensor([old]), torch.tensor([new]))[0, 0]) >= self.recompute_iou
        ):
            inside = (
                (clicks[:, 0] >= old[0]) & (clicks[:, 0] < old[2]) & (clicks[:, 1] >= old[1]) & (clicks[:, 1] < old[3])
            )
            if inside.all():
                return old
        return new

    def _box_crop(self, crop: Box) -> Box:
        """A box's ``crop``, or the whole image where the crop enlarges the picture less than ``box_min_zoom`` times
        more than the whole image's input does."""
        h, w = self._hw
        x0, y0, x1, y1 = crop
        p = self.predictor
        return crop if p.input_scale(y1 - y0, x1 - x0) >= self.box_min_zoom * p.input_scale(h, w) else self.full_box

    def _low_res(self, logits: np.ndarray, crop: Box) -> np.ndarray:
        """:func:`mask_prompt` with this predictor's model."""
        return mask_prompt(self.model, logits, crop)

    def _use(self, crop: Box) -> None:
        """Let the wrapped predictor hold ``crop`` (one embedding per new crop; the whole image's is kept)."""
        if crop != self._crop:
            x0, y0, x1, y1 = crop
            cached = self._whole if crop == self.full_box else None
            if cached is None and self.crop_cache is not None:
                cached = self.crop_cache.get(crop)
            if cached is not None:
                embedding, original_size, input_size, decoder_inputs, refiner_image = cached
                self.predictor.set_embedding(
                    embedding, original_size, input_size, decoder_inputs=decoder_inputs, refiner_image=refiner_image
                )
            else:
                p = self.predictor
                p.set_image(np.ascontiguousarray(self.image[y0:y1, x0:x1]))
                if self.crop_cache is not None:
                    self.crop_cache.put(crop, _held(p))
            self.predictor.is_crop = crop != self.full_box  # a model's crop refiner refines crops' masks
            self._crop = crop


def _held(p: SamPredictor) -> CropEmbedding:
    """What ``p`` holds of its image, to set it again with ``set_embedding``."""
    return p.get_image_embedding(), p.original_size, p.input_size, p.get_decoder_inputs(), p.get_refiner_image()


def _with_box_of(mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The corners of ``mask``'s tight box (``H x W`` bool, not empty) and the clicks ``coords``: ``N x 2`` (x, y)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    corners = np.array([[cols[0], rows[0]], [cols[-1], rows[-1]]], dtype=np.float32)
    return np.concatenate([corners, coords])


def mask_prompt(model: Any, logits: np.ndarray, crop: Box) -> np.ndarray:
    """``logits`` (``H x W``, whole image) as the ``1 x s x s`` mask prompt of ``crop``: cropped, resized
    as the image is (longest side to the model's input), padded, and brought to the low-res grid."""
    x0, y0, x1, y1 = crop
    size = model.image_size
    side_h, side_w = get_preprocess_shape(y1 - y0, x1 - x0, size)
    part = torch.from_numpy(np.ascontiguousarray(logits[y0:y1, x0:x1]))[None, None]
    resized = F.interpolate(part, (side_h, side_w), mode="bilinear", align_corners=False)
    padded = torch.full((1, 1, size, size), OUTSIDE_LOGIT)
    padded[..., :side_h, :side_w] = resized
    low = F.interpolate(padded, tuple(model.prompt_encoder.mask_input_size), mode="bilinear", align_corners=False)
    return low[0].numpy()


def paste_logits(model: Any, low_res_logits: np.ndarray, crop: Box, image_hw: tuple[int, int]) -> np.ndarray:
    """Low-res logits (``C x s x s``) predicted on ``crop`` as full-resolution logits of the whole
    ``image_hw`` image (``C x H x W``; :data:`OUTSIDE_LOGIT` outside the crop)."""
    x0, y0, x1, y1 = crop
    h, w = image_hw
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise SegAnyError(f"crop {tuple(crop)} is not inside the {w}x{h} image")
    low = torch.from_numpy(np.asarray(low_res_logits, dtype=np.float32))[None]
    size = model.image_size
    logits = model.postprocess_masks(low, get_preprocess_shape(y1 - y0, x1 - x0, size), (y1 - y0, x1 - x0))[0]
    full = np.full((low.shape[1], h, w), OUTSIDE_LOGIT, dtype=np.float32)
    full[:, y0:y1, x0:x1] = logits.numpy()
    return full


def whole_image_mask_prompt(
    model: Any, low_res_logits: np.ndarray, crop: Box, image_hw: tuple[int, int]
) -> np.ndarray:
    """A mask predicted on ``crop`` (``1 x s x s`` low-res logits) as a mask prompt of the whole image
    (``1 x s x s``): to refine a zoomed mask without zooming."""
    full = paste_logits(model, low_res_logits, crop, image_hw)
    return mask_prompt(model, full[0], (0, 0, image_hw[1], image_hw[0]))
