"""SamPredictor: compute an image embedding once, then answer many prompts against it.

The API and semantics are the official ``segment_anything.SamPredictor``'s, so code ports by changing
the import. Prompts are validated: bad values raise :class:`segany.errors.SegAnyError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segany.errors import SegAnyError
from segany.modeling.build import at_image_size, input_side
from segany.modeling.fast import postprocess
from segany.modeling.point_refiner import PointRefiner, RefinerImage, RefinerPrompts
from segany.modeling.sam import Sam
from segany.perf import optimize
from segany.prompts import check_fits_float32, check_image, check_prompts
from segany.transforms import get_preprocess_shape, transform_for
from segany.utils.masks import mask_instances

# Instances of a text smaller than this fraction of the image (or 16 pixels) are dropped as noise.
MIN_INSTANCE_AREA_FRACTION = 0.002


def _to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a list of tensors, on ``device``."""
    return [v.to(device) for v in value] if isinstance(value, (list, tuple)) else value.to(device)


class SamPredictor:
    """Efficient repeated prompting of one image with a :class:`Sam` model.

    For a model whose config sets ``max_image_size`` (segany's default), an image larger than the input size
    is encoded on a larger grid, and ``self.model`` / ``self.transform`` are then the given model's on that
    grid (the same weights; :func:`~segany.modeling.build.at_image_size`) until the next image."""

    def __init__(self, sam_model: Sam, text_detector=None) -> None:
        """``text_detector``: an optional open-vocabulary detector
        (:class:`segany.text.grounding.OpenVocabularyDetector`); when set, text prompts go text -> detector
        boxes -> masks (its ``text_masks`` and ``instance_masks``) instead of through the model's text head."""
        self.model = sam_model
        self.transform = transform_for(sam_model)
        self.text_detector = text_detector
        # the model on each input grid it has met (config.max_image_size: larger images on larger grids)
        self._given = sam_model
        self._sized: dict[int, Sam] = {sam_model.image_size: sam_model}
        cfg = getattr(sam_model, "config", None)
        self._max_side: int | None = getattr(cfg, "max_image_size", None)
        self.reset_image()

    def _use_size(self, size: int) -> None:
        """``self.model``: the given model on a ``size``-pixel grid (:meth:`_is_input_side`), sharing its weights."""
        if size != self.model.image_size:
            if size not in self._sized:
                sized = at_image_size(self._given, size, self._max_side)
                mode = getattr(self._given, "speed_mode", None)  # segany.perf.optimize's, set on the given model
                self._sized[size] = optimize(sized, *mode) if mode not in (None, ("fp32", False)) else sized
            self.model = self._sized[size]
            self.transform = transform_for(self.model)

    def _is_input_side(self, size: int) -> bool:
        """Whether ``size`` is a grid this predictor's model encodes some image at: the grid of a ``size``-pixel
        image (one rule, :func:`~segany.modeling.build.input_side`)."""
        return input_side(self._given, size, size) == size

    def input_scale(self, height: int, width: int) -> float:
        """How many times a ``height x width`` image is enlarged on its way into the model (below 1: shrunk)."""
        return input_side(self._given, height, width) / max(height, width)

    # -- image -------------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an ``H x W x 3`` uint8 image (``image_format`` "RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise SegAnyError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        check_image(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        self._use_size(input_side(self._given, *image.shape[:2]))
        input_image = self.transform.apply_image(np.ascontiguousarray(image))
        input_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_torch, image.shape[:2])
        if self._refiner_input is not None:  # the point refiner reads the original pixels (a copy: they may change)
            pixels = torch.from_numpy(np.array(image)).to(self.device)  # in the model's channel order: RGB
            mean, std = self.model.pixel_mean, self.model.pixel_std
            self.refiner_image = RefinerImage.of(pixels, self._refiner_input, self.input_size, mean, std)
            self._refiner_input = None
        if self.text_detector is not None:  # the detector looks at the pixels, not the embedding
            rgb = image if self.model.image_format == "RGB" else image[..., ::-1]
            self.image_rgb = np.ascontiguousarray(rgb)

    @torch.inference_mode()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Compute the embedding of a ``1 x 3 x h x w`` image already resized by ``self.transform``."""
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[1] != 3
            or not self._is_input_side(max(*transformed_image.shape[2:]))
        ):
            larger = f" (or a multiple of 32 up to {self._max_side} for a larger image)" if self._max_side else ""
            raise SegAnyError(
                f"set_torch_image expects 1x3xHxW with the longest side {self._given.image_size}{larger}, "
                f"got {tuple(transformed_image.shape)}"
            )
        self._use_size(max(*transformed_image.shape[2:]))
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        x = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        self.features, self.decoder_inputs = self.model.embed_image(x)
        if getattr(self.model, "point_refiner", None) is not None:
            self._refiner_input = x
        if getattr(self.model, "text_head", None) is not None:
            self._text_input = x  # the text head's pixel path runs on first text prompt only
        self.is_image_set = True

    def set_embedding(
        self,
        embedding: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int] | None = None,
        text_features: tuple[torch.Tensor, ...] | None = None,
        decoder_inputs: dict[str, Any] | None = None,
        refiner_image: RefinerImage | None = None,
    ) -> None:
        """Reuse a cached ``1 x C x h x w`` embedding (e.g. from :meth:`get_image_embedding`), for text
        prompts the text head's pixel features (:meth:`get_text_features`) of the same image, for
        SAM 2 / SAM-HQ the decoder's other image inputs (:meth:`get_decoder_inputs`), and for a model with a
        point refiner what it reads of the image (:meth:`get_refiner_image`; without it the masks are the
        model's upsampled ones, unrefined)."""
        self.reset_image()
        if self._max_side is not None:  # the embedding's width says which grid it is of
            side = embedding.shape[-1] * self._given.config.encoder.stride
            if self._is_input_side(side):
                self._use_size(side)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = input_size or get_preprocess_shape(*self.original_size, self.model.image_size)
        self.features = embedding.to(self.device)
        needed = getattr(self.model, "decoder_input_names", ())
        if decoder_inputs is None and needed:
            raise SegAnyError(f"this model needs the image's decoder_inputs ({', '.join(needed)}) with its embedding")
        self.decoder_inputs = {k: _to_device(v, self.device) for k, v in (decoder_inputs or {}).items()}
        if text_features is not None:
            self.text_features = tuple(t.to(self.device) for t in text_features)
        if refiner_image is not None and getattr(self.model, "point_refiner", None) is not None:
            self.refiner_image = refiner_image.to(self.device)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The ``1 x C x h x w`` embedding of the current image."""
        self._require_image()
        return self.features

    def get_refiner_image(self) -> RefinerImage | None:
        """What the model's point refiner reads of the current image (None for a model without one, or an image
        given by :meth:`set_torch_image` alone): give it to :meth:`set_embedding` with the embedding."""
        self._require_image()
        return self.refiner_image

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.decoder_inputs: dict[str, Any] = {}
        self.original_size = None
        self.input_size = None
        self.image_rgb = None
        self._text_input = None
        self.text_features = None
        self._refiner_input: torch.Tensor | None = None
        self.refiner_image: RefinerImage | None = None
        #: the image is a crop of a larger one (zoom-in's, set by ZoomInPredictor): refined by the crop refiner
        self.is_crop = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    # -- prompts -----------------------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | None = None,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set, in the original image frame.

        Args:
            point_coords: ``N x 2`` (x, y) pixels; point_labels: ``N`` (1 positive, 0 negative).
            box: ``4`` XYXY pixels. mask_input: ``1 x s x s`` low-res logits from an earlier call, where
                ``s = 4 * embedding side = model.image_size // 4`` (256 for SAM's 1024 input, 64 for the
                default model's 256: ``model.prompt_encoder.mask_input_size``).
            multimask_output: 3 masks for an ambiguous prompt (True) or 1 (False).
            return_logits: return logits instead of binary masks.
            text: a phrase ("the cat"), alone or with points/box. It goes through the model's text head
                (one mask: text is not ambiguous the way a click is, so ``multimask_output`` is not
                used), or, with a ``text_detector``, to the detector's best box (see
                :meth:`predict_instances` for one mask per matching object).
            hq_token_only: SAM-HQ only: the HQ output token's mask alone, not added to SAM's (upstream's).
        Returns:
            masks ``C x H x W``, iou_predictions ``C``, low_res_logits ``C x s x s``.
        """
        self._require_image()
        if text is not None and self.text_detector is not None:
            return self.text_detector.text_masks(self, text, point_coords, point_labels, box, mask_input, return_logits)
        coords, labels, b, m = check_prompts(
            point_coords, point_labels, box, mask_input, self.model.prompt_encoder.mask_input_size
        )
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords = self.transform.apply_coords(coords, self.original_size)
            check_fits_float32("point_coords", coords)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if b is not None:
            b = self.transform.apply_boxes(b, self.original_size)
            check_fits_float32("box", b)
            box_t = torch.as_tensor(b, dtype=torch.float, device=self.device)
        if m is not None:
            mask_t = torch.as_tensor(m, dtype=torch.float, device=self.device)[None]
        text_t = self.embed_text([text]) if text is not None else None
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output=multimask_output, return_logits=return_logits,
            text_embeddings=text_t, hq_token_only=hq_token_only,
        )
        return masks[0].cpu().numpy(), iou[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text_embeddings: torch.Tensor | None = None,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompt sets at once, already in the resized frame (see ``self.transform``).

        Args:
            point_coords: ``B x N x 2``; point_labels: ``B x N``; boxes: ``B x 4``;
            mask_input: ``B x 1 x s x s`` (``s = model.image_size // 4``, see :meth:`predict`).
            text_embeddings: ``B x D`` sentence vectors (:meth:`embed_text`): decoded by the text head,
                one mask each (C = 1).
        Returns:
            masks ``B x C x H x W``, iou_predictions ``B x C``, low_res_logits ``B x C x s x s`` (where the model's
            point refiner refines the masks: the refined answer's, its refined pixels' changes added as area
            means, shifted so that the answer's cut is at 0).
        """
        low_res, iou = self.predict_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output, text_embeddings, hq_token_only
        )
        # the point refiner was trained on clicks' and boxes' masks: on the text head's it lost (MODELS.md)
        refine = text_embeddings is None and self._refiner() is not None
        threshold = None if return_logits or refine else self.model.mask_threshold
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size, threshold=threshold)
        if refine:
            # the low-res logits returned are the refined answer's, cut where it is cut: a next prompt's mask
            # input then holds what the user saw, not the decoder's coarser mask (MODELS.md, "The refined answer
            # as the next mask input")
            answer = low_res.float().clone(memory_format=torch.contiguous_format)  # the refiners read low_res
            masks = self.refine_masks(masks, low_res, point_coords, point_labels, boxes, mask_input is not None, answer)
            cut = self.answer_threshold(first_prompt=mask_input is None)
            masks = masks if return_logits else postprocess.greater(masks, cut)
            low_res = answer - cut
        bound = getattr(self.model, "low_res_logit_bound", None)
        if bound is not None:  # SAM 2 returns its low-res logits clamped (the masks are made before)
            low_res = low_res.clamp(-bound, bound)
        return masks, iou, low_res

    def answer_threshold(self, first_prompt: bool) -> float:
        """The logit above which a pixel is in this predictor's refined answer (:meth:`refine_masks`) to a first
        prompt (a click or box without a mask input; zoom-in's first click answered again on its crop) or to a
        later one: ``SamConfig.first_prompt_threshold`` for a first prompt (the point refiner's first answers come
        out a little small: MODELS.md); SAM's ``mask_threshold`` for every other answer, and wherever the
        predictor does not refine."""
        if not first_prompt or self._refiner() is None:
            return self.model.mask_threshold
        return float(getattr(self.model.config, "first_prompt_threshold", self.model.mask_threshold))

    @torch.inference_mode()
    def refine_masks(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        with_mask_input: bool = False,
        answer_low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upsampled logits ``B x C x H x W`` (or ``B x H x W``) of the current image (low-res ``... x 4h x 4w``)
        with their uncertain pixels corrected by the model's point refiner (``SamConfig.point_refiner``), where
        the predictor has what it reads of the image (:meth:`get_refiner_image`); otherwise unchanged. The
        prompts that made them are :meth:`predict_torch`'s (``B`` rows, in the model's input frame);
        ``with_mask_input``: those prompts had a mask input (the correction decoder's answers), so
        ``SamConfig.correction_refiner_budget`` of each mask's pixels are refined rather than the refiner's own
        budget, and the point refiner's answers are refined again by the model's second refiner, if it has one
        (``SamConfig.second_refiner``). Float32 logits are changed in place, and ``answer_low_res`` (float32
        low-res logits shaped as ``low_res``, if given) with them (:meth:`PointRefiner.forward`)."""
        refiner = self._refiner()
        if refiner is None:
            return logits
        per_row = logits.shape[1] if logits.dim() == 4 else 1  # a prompt's C masks share it

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(per_row, 0)

        boxes = boxes.reshape(-1, 4) if boxes is not None else None
        prompts = RefinerPrompts(rows(point_coords), rows(point_labels), rows(boxes))
        maps = [*self.decoder_inputs["high_res_features"], self.features]
        budget = getattr(self.model.config, "correction_refiner_budget", None) if with_mask_input else None
        args = (low_res, self.refiner_image, maps, self.input_size, prompts, budget, answer_low_res)
        out = refiner(logits.float(), *args)
        second = getattr(self.model, "second_refiner", None)
        if with_mask_input and second is not None and refiner is self.model.point_refiner:
            out = second(out, *args)
        return out

    def _refiner(self) -> PointRefiner | None:
        """The refiner of the current image's masks: the crop refiner on zoom-in's crops and on the images the
        point refiner leaves, else the point refiner; None without the pixels they read or where neither takes
        the image (one the input enlarges past its ``max_upscale``)."""
        if self.refiner_image is None:
            return None
        refiner = self.model.point_refiner
        crop = getattr(self.model, "crop_refiner", None)
        if crop is not None and (self.is_crop or not refiner.refines(self.input_size, self.original_size)):
            refiner = crop  # zoom-in's crop, or an image the point refiner leaves
        return refiner if refiner.refines(self.input_size, self.original_size) else None

    @torch.inference_mode()
    def predict_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        text_embeddings: torch.Tensor | None = None,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_torch` without the upsampling: low-res logits ``B x C x 4h x 4w``, IoUs ``B x C``."""
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        pe = self.model.prompt_encoder.get_dense_pe()
        if text_embeddings is not None:
            return self._text_head().decode(
                text_embeddings.to(self.device), self.features, pe, sparse, dense, self.get_text_features()
            )
        extra = self.model.prompt_inputs(mask_input, points, boxes)
        return self.decode(sparse, dense, multimask_output, hq_token_only, extra, correction=mask_input is not None)

    @torch.inference_mode()
    def decode(
        self,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        prompt_inputs: dict[str, torch.Tensor] | None = None,
        correction: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's mask decoder on the current image for prompt embeddings (``B x T x C`` sparse,
        ``B x C x h x w`` dense; ``prompt_inputs``: the model's :meth:`~segany.modeling.sam.Sam.prompt_inputs`
        for them; ``correction``: the prompts hold a mask input, answered by the model's
        :meth:`~segany.modeling.sam.Sam.decoder_for` it): low-res logits ``B x C x 4h x 4w`` and IoUs ``B x C``."""
        extra = {**self.decoder_inputs, **(prompt_inputs or {})}
        if hq_token_only:  # SAM-HQ: the HQ token's mask alone (upstream's option)
            if "interm_embeddings" not in extra:
                raise SegAnyError("hq_token_only needs a SAM-HQ model")
            extra["hq_token_only"] = True
        region = self.model.decoder_region(self.input_size)
        if region is not None:  # the model decodes only what the post-processing reads
            extra["region"] = region
        decoder = self.model.decoder_for(correction)
        return decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **extra,
        )

    def get_decoder_inputs(self) -> dict[str, Any]:
        """The mask decoder's image inputs besides the embedding (empty for SAM; SAM 2's high-resolution
        features, SAM-HQ's early ViT features): give them to :meth:`set_embedding` with the embedding."""
        self._require_image()
        return self.decoder_inputs

    # -- text ----------------------------------------------------------------------------------------

    def _text_head(self):
        head = getattr(self.model, "text_head", None)
        if head is None:
            raise SegAnyError(
                "this model has no text head: train one (segany train-text) or give the predictor a "
                "text_detector (segany.text.grounding)"
            )
        return head

    @torch.inference_mode()
    def get_text_features(self) -> tuple[torch.Tensor, ...] | None:
        """The text head's pixel features of the current image (None when the head has no pixel path)."""
        self._require_image()
        head = self._text_head()
        if head.pixels is None:
            return None
        if self.text_features is None:
            if self._text_input is None:
                raise SegAnyError(
                    "text prompts need the image's pixel features: use set_image, or give set_embedding the "
                    "text_features of get_text_features()"
                )
            self.text_features = head.image_features(self._text_input)
            self._text_input = None
        return self.text_features

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """``N x D`` sentence vectors of ``texts`` from the text head's frozen sentence encoder."""
        from segany.modeling.text_encoder import load_sentence_encoder

        return load_sentence_encoder(self._text_head().config.sentence_encoder).encode(texts).to(self.device)

    @torch.inference_mode()
    def predict_instances(
        self, text: str, max_instances: int = 5, min_score: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """One mask per object that ``text`` names ("the people"), best first.

        The text head answers a phrase with one mask, the union of everything the phrase names: the
        instances are its connected parts, each scored by its mean text probability times the head's
        predicted IoU (:func:`segany.utils.masks.mask_instances`). Objects that touch come out as one
        instance: the default model's single-point masks are too weak to split them reliably (on two
        separate red circles, point-grid candidates covered under 20% of a circle each, components 98%).
        With a ``text_detector``, the instances are the detector's boxes turned into masks.

        Returns:
            masks ``K x H x W`` bool and scores ``K`` (K <= ``max_instances``), sorted by score.
        """
        if not isinstance(max_instances, int) or isinstance(max_instances, bool) or max_instances < 1:
            raise SegAnyError(f"max_instances must be a positive integer, got {max_instances!r}")
        self._require_image()
        if self.text_detector is not None:
            return self.text_detector.instance_masks(self, text, max_instances, min_score)
        logits, iou, _ = self.predict(text=text, return_logits=True)
        h, w = self.original_size
        min_area = max(16, MIN_INSTANCE_AREA_FRACTION * h * w)
        return mask_instances(logits[0], float(iou[0]), self.model.mask_threshold, min_area, max_instances, min_score)
