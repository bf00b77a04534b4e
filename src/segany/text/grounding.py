"""Text prompts through an open-vocabulary detector ("grounding"): text -> boxes -> SAM masks.

Where the user has the weights of an open-vocabulary detector on disk (OWLv2, OWL-ViT or Grounding DINO
as saved by the ``transformers`` library), :class:`OpenVocabularyDetector` turns one text query into
boxes in the original image frame, and :func:`masks_from_detections` turns those boxes into SAM masks
with a :class:`segany.predictor.SamPredictor`. Given to a predictor (``SamPredictor(model,
text_detector=detector)``), it answers the predictor's text prompts (:meth:`OpenVocabularyDetector.text_masks`,
:meth:`OpenVocabularyDetector.instance_masks`).

Loading is strictly local (``local_files_only=True``): nothing is ever downloaded. ``transformers`` is
an optional dependency (``pip install "segany[text]"``) imported only when a detector is loaded.

One query string per call: the text is passed to the detector as it is (OWL models embed it as a single
query, truncated to their 16-token text window; Grounding DINO reads it as a caption and names each box
with the words it grounded). Splitting "cats and dogs" into several queries is left to the caller.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segany.errors import SegAnyError
from segany.prompts import check_image
from segany.utils.masks import box_nms

# config.json ``model_type`` -> the kind of detector (which pre/post-processing applies).
SUPPORTED_MODEL_TYPES: dict[str, str] = {"owlv2": "owlv2", "owlvit": "owlvit", "grounding-dino": "grounding_dino"}
KINDS = ("owlv2", "owlvit", "grounding_dino")

# Score thresholds that suit each kind's calibration: OWL scores are low (0.1 is the value of the
# transformers examples and the OWL papers' demos), Grounding DINO's are high (0.35 box / 0.25 text in
# its authors' demo).
DEFAULT_BOX_THRESHOLD: dict[str, float] = {"owlv2": 0.1, "owlvit": 0.1, "grounding_dino": 0.35}
# Grounding DINO: a text token whose score for a box passes this is part of the box's label.
GROUNDING_DINO_TEXT_THRESHOLD = 0.25
# Boxes of one query overlapping more than this (IoU) are the same object: the lower-scoring one goes.
DEFAULT_NMS_IOU = 0.5
# Boxes prompted through SAM at once in masks_from_detections: bounds the B x 3 x H x W mask tensor.
MASK_BATCH = 32

_INSTALL_HINT = 'open-vocabulary detection needs the text extra: pip install "segany[text]"'


@dataclass
class Detections:
    """Boxes found for one text query, sorted best first.

    Attributes:
        boxes: ``N x 4`` float32 XYXY in the original image's pixels (clipped to the image).
        scores: ``N`` float32 detector confidences in ``[0, 1]``, decreasing.
        labels: ``N`` strings: the query (OWL) or the words of it grounded in each box (Grounding DINO).
        image_size: ``(H, W)`` of the image the boxes belong to (checked by :func:`masks_from_detections`).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    image_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.scores)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SegAnyError(_INSTALL_HINT) from None
    return transformers


class OpenVocabularyDetector:
    """A ``transformers`` open-vocabulary detector (OWLv2, OWL-ViT or Grounding DINO) and its processor.

    Build it with :meth:`from_pretrained` (a local folder) or directly from a model and processor already
    in memory; ``kind`` defaults to the one of ``model.config.model_type``.
    """

    def __init__(self, model: Any, processor: Any, kind: str | None = None) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        kind = kind or SUPPORTED_MODEL_TYPES.get(str(model_type))
        if kind not in KINDS:
            raise SegAnyError(
                f"unsupported detector (model_type {model_type!r}, kind {kind!r}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model.eval()
        self.processor = processor
        self.kind = kind

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> OpenVocabularyDetector:
        """Load a detector saved with ``save_pretrained`` in the folder ``path`` (never downloads).

        The kind is read from the folder's ``config.json`` (``model_type``).

        Raises:
            SegAnyError: ``transformers`` missing, the folder or its config missing or unreadable, a model
                type that is not a supported detector, or weights / processor files that do not load.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise SegAnyError(f"detector folder not found: {folder}")
        config_file = folder / "config.json"
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except FileNotFoundError:
            raise SegAnyError(f"{folder}: no config.json (expected a transformers detector folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise SegAnyError(f"{config_file}: not a readable JSON config ({e})") from None
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SegAnyError(
                f"{folder}: model_type {model_type!r} is not a supported open-vocabulary detector "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        transformers = _import_transformers()
        try:
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            # transformers says what is missing (weights, tokenizer files...); keep its words, name the folder.
            raise SegAnyError(f"{folder}: could not load the {model_type} detector: {e}") from None
        return cls(model.to(device), processor, SUPPORTED_MODEL_TYPES[model_type])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def default_box_threshold(self) -> float:
        return DEFAULT_BOX_THRESHOLD[self.kind]

    # -- detection ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def detect(
        self,
        image: np.ndarray,
        text: str,
        box_threshold: float | None = None,
        max_detections: int = 20,
        nms_iou_threshold: float = DEFAULT_NMS_IOU,
    ) -> Detections:
        """Boxes of the objects that ``text`` describes in ``image``.

        Args:
            image: ``H x W x 3`` uint8 RGB.
            text: one query (e.g. "a red car"), not empty.
            box_threshold: keep boxes scoring above this; None: the kind's default
                (:data:`DEFAULT_BOX_THRESHOLD`).
            max_detections: at most this many boxes, the best.
            nms_iou_threshold: of two boxes overlapping more than this (IoU), the lower-scoring one goes.

        Returns:
            :class:`Detections`, best first; boxes in ``image``'s pixels, clipped to it; boxes with no area
            inside the image (e.g. in the padding OWLv2 adds) are dropped.
        """
        check_image(image)
        if not isinstance(text, str) or not text.strip():
            raise SegAnyError(f"text must be a non-empty string, got {text!r}")
        threshold = self.default_box_threshold if box_threshold is None else box_threshold
        if not 0.0 <= float(threshold) < 1.0:
            raise SegAnyError(f"box_threshold must be in [0, 1), got {threshold}")
        if not 0.0 <= float(nms_iou_threshold) <= 1.0:
            raise SegAnyError(f"nms_iou_threshold must be in [0, 1], got {nms_iou_threshold}")
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise SegAnyError(f"max_detections must be a positive integer, got {max_detections!r}")

        h, w = image.shape[:2]
        text = text.strip()
        if self.kind == "grounding_dino":
            boxes, scores, labels = self._detect_grounding_dino(image, text, float(threshold))
        else:
            boxes, scores, labels = self._detect_owl(image, text, float(threshold))
        # Normalised [0, 1] boxes -> pixels of the frame they are relative to, then into the image.
        frame_h, frame_w = self._box_frame(h, w)
        boxes = boxes.float().cpu() * torch.tensor([frame_w, frame_h, frame_w, frame_h], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        scores = scores.float().cpu()
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        idx = torch.nonzero(inside).flatten()
        # box_nms returns the kept indices by decreasing score: the order of the result.
        idx = idx[box_nms(boxes[idx], scores[idx], float(nms_iou_threshold))][:max_detections]
        return Detections(
            boxes=boxes[idx].numpy().astype(np.float32).reshape(-1, 4),
            scores=scores[idx].numpy().astype(np.float32),
            labels=[labels[i] for i in idx.tolist()],
            image_size=(h, w),
        )

    def text_masks(
        self, predictor: Any, text: str, point_coords, point_labels, box, mask_input, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predictor.predict(text=...)`` through this detector: its best box (with any points) -> one mask.

        With no detection the answer is one empty mask with a predicted IoU of 0.
        """
        if box is not None:
            raise SegAnyError("with a text detector, text replaces the box prompt: give text or a box, not both")
        dets = self.detect(predictor.image_rgb, text, max_detections=1)
        if len(dets.scores) == 0:
            h, w = predictor.original_size
            side = predictor.model.prompt_encoder.mask_input_size
            empty = np.full((1, h, w), -np.inf if return_logits else False, np.float32 if return_logits else bool)
            return empty, np.zeros((1,), np.float32), np.full((1, *side), -1e4, np.float32)
        return predictor.predict(
            point_coords, point_labels, dets.boxes[0], mask_input, multimask_output=False, return_logits=return_logits
        )

    def instance_masks(
        self, predictor: Any, text: str, max_instances: int, min_score: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """``predictor.predict_instances(text)`` through this detector: one mask per detected box, best
        first (masks ``K x H x W`` bool, scores ``K``)."""
        dets = self.detect(predictor.image_rgb, text, max_detections=max_instances)
        masks, scores = masks_from_detections(predictor, dets)
        keep = scores >= min_score
        return masks[keep][:max_instances], scores[keep][:max_instances]

    def _box_frame(self, h: int, w: int) -> tuple[int, int]:
        """``(height, width)`` in original pixels that the detector's normalised box coordinates span.

        OWLv2's processor pads the image bottom/right to a square before resizing, so its boxes are
        relative to the ``max(H, W)`` square whose top-left corner is the image's (the post-processing
        of recent transformers scales by max(H, W) for this reason, older ones by (W, H); scaling here
        gives the right boxes with both). OWL-ViT stretches the image and Grounding DINO keeps the aspect
        ratio (one image: no batch padding), so their boxes are relative to the image itself.
        """
        if self.kind == "owlv2" and getattr(self.processor.image_processor, "do_pad", True):
            side = max(h, w)
            return side, side
        return h, w

    def _image_inputs(self, image: np.ndarray) -> Any:
        """The processor's ``pixel_values`` (and Grounding DINO's ``pixel_mask``), on the model's device."""
        # Channels-last said explicitly: the processor guesses otherwise, wrongly for tiny images (3 x 3 x 3).
        inputs = self.processor.image_processor(images=image, input_data_format="channels_last", return_tensors="pt")
        # Floating tensors follow the model's dtype too (weights saved and loaded in fp16 / bf16).
        return inputs.to(device=self.device, dtype=self.model.dtype)

    def _detect_owl(self, image: np.ndarray, text: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Normalised XYXY boxes ``N x 4``, scores ``N``, labels of one OWL query (unsorted)."""
        # The OWL text tower has a fixed window (16 tokens); longer queries are cut rather than failing.
        max_len = int(self.model.config.text_config.max_position_embeddings)
        text_inputs = self.processor.tokenizer(
            [text], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        outputs = self.model(**text_inputs.to(self.device), **self._image_inputs(image))
        # target_sizes=None: normalised boxes, scaled by _box_frame (see there why).
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=None
        )[0]
        return result["boxes"], result["scores"], [text] * len(result["scores"])

    def _detect_grounding_dino(
        self, image: np.ndarray, text: str, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Normalised XYXY boxes ``N x 4``, scores ``N``, grounded phrases (unsorted)."""
        # Grounding DINO was trained on lower-case captions whose phrases end with a period.
        caption = text.lower() if text.endswith(".") else text.lower() + "."
        tokenizer = self.processor.tokenizer
        text_inputs = tokenizer(
            [caption], truncation=True, max_length=int(self.model.config.max_text_len), return_tensors="pt"
        )
        outputs = self.model(**text_inputs.to(self.device), **self._image_inputs(image))
        post = self.processor.post_process_grounded_object_detection
        # The score threshold is `threshold` in recent transformers, `box_threshold` in older ones.
        name = "threshold" if "threshold" in inspect.signature(post).parameters else "box_threshold"
        result = post(
            outputs,
            input_ids=text_inputs["input_ids"],
            text_threshold=GROUNDING_DINO_TEXT_THRESHOLD,
            target_sizes=None,
            **{name: threshold},
        )[0]
        # "text_labels" in recent transformers; older ones put the phrases in "labels".
        phrases = result["text_labels"] if "text_labels" in result else result["labels"]
        special = set(tokenizer.all_special_tokens)
        labels = []
        for phrase in phrases:
            # The grounded tokens can include [SEP]/[CLS]; a box with no grounded word is named by the query.
            words = [t for t in str(phrase).split() if t not in special]
            labels.append(" ".join(words) or text)
        return result["boxes"], result["scores"], labels


def masks_from_detections(
    predictor: Any,
    detections: Detections,
    multimask_output: bool = False,
    return_order: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAM masks for detected boxes: each box is a box prompt to ``predictor`` (its image already set).

    Args:
        predictor: a :class:`segany.predictor.SamPredictor` whose image is the one detections came from.
        detections: from :meth:`OpenVocabularyDetector.detect`.
        multimask_output: ask SAM for 3 masks per box and keep the one with the best predicted IoU
            (False: SAM's single-mask output, the usual choice for an unambiguous box).
        return_order: also return ``order`` (``N`` ints): ``masks[i]`` belongs to ``detections[order[i]]``
            (its box and label).

    Returns:
        masks ``N x H x W`` bool, scores ``N`` float32 (detector score x SAM's predicted IoU), best first;
        with ``return_order``, the order too.
    """
    if not getattr(predictor, "is_image_set", False):
        raise SegAnyError("set the image on the predictor (predictor.set_image) before masks_from_detections")
    h, w = predictor.original_size
    if detections.image_size is not None and tuple(detections.image_size) != (h, w):
        raise SegAnyError(
            f"the detections are for a {detections.image_size[0]}x{detections.image_size[1]} image but the "
            f"predictor's image is {h}x{w}"
        )
    boxes = np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4)
    det_scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
    if len(boxes) != len(det_scores):
        raise SegAnyError(f"detections hold {len(boxes)} boxes but {len(det_scores)} scores")
    masks = np.zeros((len(boxes), h, w), dtype=bool)
    ious = np.zeros(len(boxes), dtype=np.float32)
    for s in range(0, len(boxes), MASK_BATCH):
        box_t = torch.as_tensor(boxes[s : s + MASK_BATCH], device=predictor.device)
        box_t = predictor.transform.apply_boxes_torch(box_t, (h, w))
        batch_masks, batch_iou, _ = predictor.predict_torch(None, None, boxes=box_t, multimask_output=multimask_output)
        best = batch_iou.argmax(dim=1)  # single-mask output: C = 1, index 0
        rows = torch.arange(len(best), device=best.device)
        masks[s : s + len(best)] = batch_masks[rows, best].cpu().numpy()
        ious[s : s + len(best)] = batch_iou[rows, best].float().cpu().numpy()
    scores = det_scores * ious
    order = np.argsort(-scores, kind="stable")
    if return_order:
        return masks[order], scores[order], order
    return masks[order], scores[order]
