"""SamAutomaticMaskGenerator: "segment everything" from a grid of point prompts.

Same arguments, defaults, records and results as the official generator. It is faster because the
work is ordered differently, not approximated:

* the mask decoder is re-associated for "one image, many one-point prompts"
  (:class:`~segany.modeling.fast.decoder.ReassociatedDecoder`):
  the prompt-independent image side is computed once per image, each prompt's 4096 image tokens are
  kept in factored form (per-image products plus a low-rank per-prompt part: no 4096 x 256 tensor per
  prompt in the transformer), and prompts are decoded a few at a time by worker threads that run on one
  core each (robust on a busy machine, where multi-threaded small operations stall);
* candidates are filtered by predicted IoU before anything is upscaled: prompts none of whose masks
  pass are never upscaled, and only the survivors are upsampled to full size (the official code
  upsamples every candidate first);
* the upscaling and the upsampling skip the part of the low-res map that lies in the input padding
  (the official post-processing crops it away), e.g. a third of the work for a 3:2 image;
* masks are kept as compressed COCO RLE (pycocotools, C) rather than Python run lists.

The model's own decoder (``fast_decoder = False``) is used for decoders of another layout, and for models
built without the fast paths (``build_sam(config, fast=False)``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

from segany.errors import SegAnyError
from segany.modeling.fast import postprocess
from segany.modeling.fast.decoder import ReassociatedDecoder
from segany.modeling.fast.sam2_decoder import reassociated_class, reassociated_decoder
from segany.modeling.sam import Sam
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

#: The generator's filters, in the order they run (see ``SamAutomaticMaskGenerator.filter_counts``).
FILTERS = (
    "pred_iou_thresh",
    "stability_score_thresh",
    "crop_edge",
    "box_nms",
    "crop_nms",
    "min_mask_region_area",
    "max_mask_region_fraction",
)


def describe_filter_counts(counts: dict[str, int]) -> str:
    """One line for people: how many candidates there were and what each filter removed, e.g.
    "0 of 3072 candidates kept: pred_iou_thresh removed 3050, stability_score_thresh removed 22"."""
    removed = [f"{name} removed {counts[name]}" for name in FILTERS if counts.get(name)]
    text = f"{counts.get('kept', 0)} of {counts.get('candidates', 0)} candidates kept"
    return text + (": " + ", ".join(removed) if removed else "")


# Candidates upsampled to full size at once: bounds peak memory (each is an H x W float map).
UPSAMPLE_CHUNK = 16


@dataclass
class _Masks:
    """Candidate masks of one crop or image: compressed RLEs (in the full image frame) and their data."""

    rles: list[dict[str, Any]] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)  # XYXY, full image frame
    iou_preds: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor] = field(default_factory=list)
    crop_boxes: list[torch.Tensor] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)  # filter name -> candidates it removed

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
            "removed": self.removed,
        }


def _filter(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    idx = keep.tolist() if keep.dtype != torch.bool else torch.nonzero(keep).flatten().tolist()
    out = {k: v[keep] for k, v in data.items() if isinstance(v, torch.Tensor)}
    out["rles"] = [data["rles"][i] for i in idx]
    if "removed" in data:
        out["removed"] = data["removed"]
    return out


def _encode(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``N x H x W`` bool -> compressed RLEs (pycocotools' native form, bytes counts)."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    return mask_utils.encode(arr)


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image from a point grid, with the official filters.

    Args (the official ones, same defaults):
        model: a :class:`Sam`.
        points_per_side: grid density (``points_per_side**2`` prompts); None requires ``point_grids``.
        points_per_batch: prompts run through the decoder at once.
        pred_iou_thresh: keep masks whose predicted IoU is above this; None: the official generator's
            default for the model (SAM's 0.88, SAM 2's 0.8).
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
        pred_iou_thresh: float | None = None,
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
        if pred_iou_thresh is None:
            pred_iou_thresh = 0.8 if getattr(model, "resize_mode", None) == "stretch" else 0.88
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
        #: What the last :meth:`generate` saw: ``candidates`` (prompts x multimask outputs), how many each
        #: filter removed (``pred_iou_thresh``, ``stability_score_thresh``, ``crop_edge``, ``box_nms``,
        #: ``crop_nms``, ``min_mask_region_area``, ``max_mask_region_fraction``) and ``kept``.
        self.filter_counts: dict[str, int] = {}
        # The re-associated decoder (same results, less work) for a model built with the fast paths; the
        # model's own decoder otherwise.
        self.fast_decoder = reassociated_class(model) is not None

    @torch.inference_mode()
    def generate(self, image: np.ndarray, embedding: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Masks for an ``H x W x 3`` uint8 RGB image, as the official list of records.

        Each record: segmentation (per output_mode), area, bbox (XYWH), predicted_iou, point_coords
        ([[x, y]]), stability_score, crop_box (XYWH).

        ``embedding``: the image's embedding computed before, as :meth:`SamPredictor.set_embedding`'s
        keyword arguments (e.g. a server's cache); the crop that is the whole image then skips the encoder
        (zoomed crops cannot use it).
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegAnyError(f"image must be an H x W x 3 uint8 array, got {getattr(image, 'shape', None)}")
        data = self._generate_masks(image, embedding)
        removed = data["removed"]
        h, w = image.shape[:2]
        if self.min_mask_region_area > 0 and data["rles"]:
            n = len(data["rles"])
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
            removed["min_mask_region_area"] += n - len(data["rles"])
        # One RLE at a time: pycocotools' list form of area() overflows past 255 masks with NumPy 2.
        areas = [int(mask_utils.area(r)) for r in data["rles"]]
        if self.max_mask_region_fraction is not None and areas:
            keep = torch.tensor([a <= self.max_mask_region_fraction * h * w for a in areas])
            data = _filter(data, keep)
            removed["max_mask_region_fraction"] += len(areas) - int(keep.sum())
            areas = [a for a, k in zip(areas, keep.tolist()) if k]
        self.filter_counts = {
            "candidates": removed["candidates"],
            **{f: removed[f] for f in FILTERS},
            "kept": len(areas),
        }
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

    def _generate_masks(self, image: np.ndarray, embedding: dict[str, Any] | None) -> dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        acc = _Masks()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            crop = self._process_crop(image, crop_box, layer_idx, orig_size, embedding)
            acc.rles += crop["rles"]
            acc.removed.update(crop["removed"])
            for name in ("boxes", "iou_preds", "stability", "points", "crop_boxes"):
                getattr(acc, name).append(crop[name])
        data = acc.cat()
        if len(crop_boxes) > 1 and data["rles"]:
            n = len(data["rles"])
            # Prefer masks from smaller crops (zoomed in, finer), as the official generator.
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(
                data["boxes"].float(), scores, torch.zeros_like(data["boxes"][:, 0]), self.crop_nms_thresh
            )
            data = _filter(data, keep)
            data["removed"]["crop_nms"] += n - len(data["rles"])
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer_idx: int,
        orig_size: tuple[int, int],
        embedding: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        cropped_size = cropped.shape[:2]
        if embedding is not None and tuple(cropped_size) == tuple(orig_size):
            self.predictor.set_embedding(**embedding)
        else:
            self.predictor.set_image(cropped)
        p = self.predictor
        decoder = reassociated_decoder(p.model, p.features, p.decoder_inputs) if self.fast_decoder else None
        points_scale = np.array(cropped_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        acc = _Masks()
        for part in self._process_points(points_for_image, cropped_size, crop_box, orig_size, decoder):
            acc.rles += part["rles"]
            acc.removed.update(part["removed"])
            for name in ("boxes", "iou_preds", "stability", "points"):
                getattr(acc, name).append(part[name])
        self.predictor.reset_image()
        data = acc.cat()
        del data["crop_boxes"]  # set below, once the crop's masks are known
        if not data["rles"]:
            data["crop_boxes"] = torch.zeros((0, 4), dtype=torch.int64)
            return data
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), self.box_nms_thresh
        )
        data["removed"]["box_nms"] += len(data["rles"]) - len(keep)
        data = _filter(data, keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.int64)
        return data

    def _process_points(
        self,
        points: np.ndarray,
        im_size: tuple[int, int],
        crop_box: list[int],
        orig_size: tuple[int, int],
        decoder: ReassociatedDecoder | None = None,
    ) -> list[dict[str, Any]]:
        """The kept masks of a crop's point prompts, in parts (in prompt order).

        The re-associated decoder takes all the points in one call: its workers take parts of
        ``points_per_batch`` prompts as they become free (no wait for the slowest at the end of every
        batch), and each also filters, upsamples and encodes its own part's candidates (that work then runs
        in parallel too). The model's decoder takes a batch at a time."""
        if decoder is None:
            batches = batch_iterator(self.points_per_batch, points)
            return [self._process_batch(batch, im_size, crop_box, orig_size) for (batch,) in batches]
        which = list(range(1, decoder.md.num_mask_tokens))  # the multimask outputs

        def candidates(start: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
            return self._candidates(points[start : start + out[0].shape[0]], *out, crop_box, orig_size)

        # the clicks' dense cells, for a model that draws them into its dense embedding (no full maps)
        sparse, cells = decoder.embed_points(self.predictor.model.prompt_encoder, self._input_points(points, im_size))
        region = decoder.region(self.predictor.input_size)
        return decoder.decode(sparse, which, self.pred_iou_thresh, region, candidates, self.points_per_batch, cells)

    def _process_batch(
        self, points: np.ndarray, im_size: tuple[int, int], crop_box: list[int], orig_size: tuple[int, int]
    ) -> dict[str, Any]:
        """One batch of point prompts through the model's own decoder: its kept masks."""
        p = self.predictor
        sparse, dense = self._embed_points(points, im_size)
        low_res, iou_preds = p.decode(sparse, dense, multimask_output=True)
        iou_preds = iou_preds.float()
        keep = iou_preds > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou_preds).bool()
        # Only candidates that pass the IoU filter are upsampled.
        low_res = low_res.flatten(0, 1)[torch.nonzero(keep.flatten()).flatten()]
        return self._candidates(points, iou_preds, keep, low_res, crop_box, orig_size)

    def _input_points(self, points: np.ndarray, im_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Single positive point prompts (``N x 2`` pixels of the crop) in the model's input frame: ``N x 1 x 2``
        coordinates and ``N x 1`` labels."""
        p = self.predictor
        in_points = torch.as_tensor(p.transform.apply_coords(points, im_size), dtype=torch.float, device=p.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=p.device)
        return in_points[:, None, :], in_labels[:, None]

    def _embed_points(self, points: np.ndarray, im_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse and dense prompt embeddings of single positive points (``N x 2`` pixels of the crop)."""
        return self.predictor.model.prompt_encoder(points=self._input_points(points, im_size), boxes=None, masks=None)

    def _candidates(
        self,
        points: np.ndarray,
        iou_preds: torch.Tensor,
        keep: torch.Tensor,
        low_res: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        """The candidates of prompts ``points`` (IoU predictions ``B x K``, ``keep`` ``B x K`` the ones past
        the IoU filter, ``low_res`` their low-res logits ``kept x h x w``) that pass the stability and the
        crop-edge filters: RLEs, boxes, IoUs, stability scores and points."""
        orig_h, orig_w = orig_size
        p = self.predictor
        n_out = iou_preds.shape[1]
        iou_preds = iou_preds.flatten(0, 1).float()
        # float64 points, as the official generator (the records carry these exact values).
        pts = torch.as_tensor(points, dtype=torch.float64).repeat_interleave(n_out, dim=0)
        idx = torch.nonzero(keep.flatten()).flatten()
        rles: list[dict[str, Any]] = []
        boxes, ious, stabs, kept_pts = [], [], [], []
        removed = Counter(candidates=iou_preds.numel(), pred_iou_thresh=iou_preds.numel() - len(idx))
        thr, cut = p.model.mask_threshold, p.answer_threshold(True)  # stability: unrefined; cut: refined first answers
        for start in range(0, len(idx), UPSAMPLE_CHUNK):
            sel = idx[start : start + UPSAMPLE_CHUNK]
            chunk = low_res[start : start + UPSAMPLE_CHUNK]
            # the model's own post-processing (a fast model's takes the re-associated decoder's partial maps)
            logits = p.model.postprocess_masks(chunk[:, None], p.input_size, p.original_size)[:, 0]
            stab = calculate_stability_score(logits, thr, self.stability_score_offset)
            ok = stab >= self.stability_score_thresh
            if self.stability_score_thresh <= 0.0:  # off, as the official generator (keeps NaN scores too)
                ok = torch.ones_like(stab).bool()
            removed["stability_score_thresh"] += int((~ok).sum())
            if not ok.any():
                continue
            # the model's point refiner (if any) on the masks that passed, at the image's resolution
            in_points, in_labels = self._input_points(pts[sel[ok].cpu()].numpy(), p.original_size)
            masks = postprocess.greater(p.refine_masks(logits[ok], chunk[ok], in_points, in_labels), cut)
            bxs = batched_mask_to_box(masks)
            ok2 = ~is_box_near_crop_edge(bxs, crop_box, [0, 0, orig_w, orig_h])
            removed["crop_edge"] += int((~ok2).sum())
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
            "removed": removed,
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
