"""Request bodies of the server's JSON endpoints (pydantic: bad types and out-of-range values -> 422)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Prompts per request: SAM was trained with up to a few dozen clicks; more is a mistake or an attack.
MAX_POINTS = 64
#: Masks in one annotation save.
MAX_ANNOTATIONS = 2000
IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"
#: Text prompts are phrases; instances per text answer.
MAX_TEXT = 200
MAX_INSTANCES = 20


class PredictRequest(BaseModel):
    """Prompts in pixel coordinates of the uploaded (upright) image."""

    points: list[tuple[float, float]] = Field(default_factory=list, max_length=MAX_POINTS,
                                              description="[[x, y], ...] click positions")
    labels: list[int] = Field(default_factory=list, max_length=MAX_POINTS,
                              description="one per point: 1 positive, 0 negative")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]")
    mask_input: str | None = Field(None, max_length=64,
                                   description="a 'logits' handle from an earlier answer, to refine that mask")
    multimask: bool = Field(True, description="3 candidate masks (true) or 1 (false)")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT,
                             description='a text prompt ("the cat"), alone or with points / box; one mask')
    instances: int | None = Field(None, ge=1, le=MAX_INSTANCES,
                                  description="with a text alone: one mask per matching object, at most this many")
    format: Literal["rle", "png"] = Field("rle", description="COCO RLE, or PNG as base64")
    zoom_in: bool = Field(False, description="answer clicks and boxes on a crop around the object (RITM's "
                                             "zoom-in: finer masks, an image embedding when the crop moves)")


class EverythingRequest(BaseModel):
    """Options of ``SamAutomaticMaskGenerator``, bounded so one request cannot occupy the server for long."""

    points_per_side: int = Field(32, ge=1, le=64)
    points_per_batch: int = Field(64, ge=1, le=256)
    pred_iou_thresh: float | None = Field(
        None, ge=0.0, le=1.0, description="None: the model family's default (SAM 0.88, SAM 2 0.8; /api/info)"
    )
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    crop_n_layers: int = Field(0, ge=0, le=1)
    min_mask_region_area: int = Field(0, ge=0, le=100_000)
    max_masks: int = Field(256, ge=1, le=1000, description="return at most this many masks, largest first")


class RLE(BaseModel):
    size: tuple[int, int]
    counts: str = Field(max_length=10_000_000)


class AnnotationMask(BaseModel):
    segmentation: RLE
    predicted_iou: float | None = None
    point_coords: list[tuple[float, float]] | None = Field(None, max_length=MAX_POINTS)


class AnnotationRequest(BaseModel):
    image_id: str = Field(pattern=IMAGE_ID_PATTERN)
    masks: list[AnnotationMask] = Field(max_length=MAX_ANNOTATIONS)
