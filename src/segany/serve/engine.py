"""The server's model side: embeddings, prompts, "everything", and the ONNX decoder, on one worker thread.

Request handlers run in a thread pool, so several clients are served at once; the torch work itself is
handed to a single inference thread (:meth:`ServedModel.run`). On a CPU two inferences at once only split
the same cores, and keeping every torch allocation in one thread keeps the memory flat: with torch
called from the many pool threads, glibc gives each its own arena and the server's RSS grew by hundreds
of MB under load. Everything around it (decoding uploads, RLE / PNG encoding, JSON) runs in the request
threads, in parallel.
"""

from __future__ import annotations

import base64
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from segany.automatic import SamAutomaticMaskGenerator
from segany.io.png import encode_png
from segany.io.rle import encode_rle, rle_area, rle_to_bbox
from segany.modeling.build import at_image_size
from segany.modeling.point_refiner import RefinerImage
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.serve.cache import CropEmbeddings, ImageEntry, cpu_copy
from segany.zoom_in import Box, ZoomInPredictor, whole_image_mask_prompt

T = TypeVar("T")
#: an upload's embedding, input size, text features, decoder inputs and point-refiner image (ServedModel.embed)
Embedded = tuple[torch.Tensor, tuple[int, int], tuple[torch.Tensor, ...] | None, dict[str, Any], RefinerImage | None]


class ServedModel:
    """One loaded model and the operations the server needs from it.

    Args:
        model: a :class:`Sam` (eval mode, CPU or GPU).
        name: shown by ``/api/info``.
    """

    def __init__(self, model: Sam, name: str = "model") -> None:
        if getattr(getattr(model, "config", None), "max_image_size", None) is not None:
            # the page decodes with one ONNX decoder, exported for one grid: every image on the model's own
            model = at_image_size(model, model.image_size, None)
        self.model = model.eval()
        self.name = name
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segany-inference")
        self._decoders: dict[bool, bytes] = {}  # first_prompt_only -> the exported graph
        self._decoder_lock = threading.Lock()
        # The generator's default for this model's family (SAM 0.88, SAM 2 0.8): what "everything" uses
        # when a request leaves pred_iou_thresh out, shown by /api/info for the page's field.
        self.pred_iou_thresh = float(SamAutomaticMaskGenerator(self.model, points_per_side=1).pred_iou_thresh)
        # The page's "Zoom in" starts ticked where a crop's embedding is cheap (a click that moves the crop
        # waits for one): the small encoders on a CPU, any model on a GPU; SAM's ViTs and SAM 2 on a CPU not.
        kind = getattr(getattr(getattr(self.model, "config", None), "encoder", None), "kind", None)
        self.zoom_in_default = self.model.device.type != "cpu" or kind in ("tiny_vit", "efficientnet_lite")

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the inference thread and wait for its result (exceptions are re-raised here)."""
        return self._worker.submit(fn).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def low_res_side(self) -> int:
        return int(self.model.prompt_encoder.mask_input_size[0])

    def info(self) -> dict[str, Any]:
        e = int(self.model.prompt_encoder.image_embedding_size[0])
        return {
            "model": self.name,
            "image_size": self.image_size,
            "embedding_shape": [1, int(self.model.prompt_encoder.embed_dim), e, e],
            "low_res_side": self.low_res_side,
            "mask_threshold": float(self.model.mask_threshold),
            "pred_iou_thresh": self.pred_iou_thresh,
            "zoom_in_default": self.zoom_in_default,
            # The ONNX decoder's image inputs besides image_embeddings (GET .../embedding?part=NAME).
            "extra_decoder_inputs": list(self.onnx_image_inputs_names()),
        }

    @property
    def is_sam_hq(self) -> bool:
        return "interm_embeddings" in getattr(self.model, "decoder_input_names", ())

    def onnx_image_inputs_names(self) -> tuple[str, ...]:
        if "high_res_features" in getattr(self.model, "decoder_input_names", ()):  # SAM 2, segany's high-res
            return ("high_res_feats_0", "high_res_feats_1")
        return ("hq_features",) if self.is_sam_hq else ()

    def onnx_image_input(self, entry: ImageEntry, name: str) -> torch.Tensor | None:
        """The image input ``name`` of the ONNX decoder (SAM 2's cached ``high_res_feats_0/1``, SAM-HQ's
        ``hq_features`` fused from the cached early ViT features), or None."""
        if name == "image_embeddings":
            return entry.embedding
        if name not in self.onnx_image_inputs_names() or not entry.decoder_inputs:
            return None
        if name == "hq_features":  # once per image here, not once per prompt in the page's decoder
            decoder, device = self.model.mask_decoder, self.model.device

            def fuse() -> torch.Tensor:
                with torch.inference_mode():
                    interm = entry.decoder_inputs["interm_embeddings"].to(device)
                    return decoder.hq_features(entry.embedding.to(device), interm).to("cpu", torch.float32)

            return self.run(fuse)
        return entry.decoder_inputs["high_res_features"][int(name[-1])]

    def embed(self, image: np.ndarray) -> Embedded:
        """``H x W x 3`` uint8 -> (``1 x C x e x e`` float32 CPU embedding, resized ``(h, w)``, the text
        head's pixel features or None, the decoder's other image inputs on the CPU: empty for SAM, what the
        model's point refiner reads of the image or None)."""
        def work() -> Embedded:
            predictor = SamPredictor(self.model)
            predictor.set_image(image)
            text = predictor.get_text_features() if self.model.text_head is not None else None
            cpu = None if text is None else tuple(t.detach().to("cpu", torch.float32).clone() for t in text)
            inputs = {k: cpu_copy(v) for k, v in predictor.get_decoder_inputs().items()}
            refiner = predictor.get_refiner_image()
            embedding = predictor.features.detach().to("cpu", torch.float32).clone()
            return embedding, predictor.input_size, cpu, inputs, (refiner.to("cpu") if refiner is not None else None)

        return self.run(work)

    def _predictor(self, entry: ImageEntry) -> SamPredictor:
        predictor = SamPredictor(self.model)
        predictor.set_embedding(
            entry.embedding,
            (entry.height, entry.width),
            entry.input_size,
            text_features=entry.text_features,
            decoder_inputs=entry.decoder_inputs,
            refiner_image=entry.refiner_image,
        )
        return predictor

    def predict(
        self,
        entry: ImageEntry,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
        text: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``SamPredictor.predict`` on the cached embedding: masks ``C x H x W`` bool, scores ``C``,
        low-res logits ``C x 4e x 4e``. Raises SegAnyError for bad prompts."""
        return self.run(
            lambda: self._predictor(entry).predict(
                points, labels, box, mask_input, multimask_output=multimask, text=text
            )
        )

    def predict_zoomed(
        self,
        entry: ImageEntry,
        decode: Callable[[], np.ndarray],
        crops: CropEmbeddings,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        previous_crop: Box | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Box]:
        """:class:`ZoomInPredictor` on the cached embedding: masks ``C x H x W`` in the image's frame, scores
        ``C``, low-res logits ``C x 4e x 4e`` and the crop they were predicted on. ``decode`` returns the
        upload's pixels, called only when a crop must be embedded; ``mask_input`` comes from an answer on
        ``previous_crop`` (None: the whole image). A first click asked for one mask is refined on a crop
        around it (``refine_first``); asked for three, they are the whole image's (the page offers the choice)."""

        def work() -> tuple[np.ndarray, np.ndarray, np.ndarray, Box]:
            zoom = ZoomInPredictor(SamPredictor(self.model), refine_first=not multimask, crop_cache=crops)
            zoom.set_embedding(
                entry.embedding, (entry.height, entry.width), decode, entry.input_size, entry.decoder_inputs,
                entry.refiner_image,
            )
            if mask_input is not None:
                zoom.remember(previous_crop or zoom.full_box, mask_input)
            masks, scores, low_res = zoom.predict(points, labels, box, mask_input, multimask_output=multimask)
            return masks, scores, low_res, zoom.last_crop

        return self.run(work)

    def whole_image_mask_input(self, entry: ImageEntry, mask_input: np.ndarray, crop: Box) -> np.ndarray:
        """A mask predicted with zoom-in on ``crop`` (``1 x 4e x 4e`` low-res logits) as a mask prompt of the
        whole image, for a request that refines it without zoom-in."""
        return self.run(lambda: whole_image_mask_prompt(self.model, mask_input, crop, (entry.height, entry.width)))

    def predict_instances(self, entry: ImageEntry, text: str, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
        """``SamPredictor.predict_instances``: one mask per object the text names, best first."""
        return self.run(lambda: self._predictor(entry).predict_instances(text, max_instances=max_instances))

    def everything(
        self, entry: ImageEntry, image: np.ndarray, options: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """``SamAutomaticMaskGenerator(**options).generate(image)`` with COCO RLE records, and the
        generator's ``filter_counts`` (what each filter removed).

        The whole-image crop reuses the cached embedding instead of running the encoder again.
        """
        gen = SamAutomaticMaskGenerator(self.model, output_mode="coco_rle", **options)
        cached = {
            "embedding": entry.embedding, "original_size": (entry.height, entry.width),
            "input_size": entry.input_size, "decoder_inputs": entry.decoder_inputs,
            "refiner_image": entry.refiner_image,
        }
        records = self.run(lambda: gen.generate(image, embedding=cached))
        return records, gen.filter_counts

    def decoder_onnx(self, first_prompt_only: bool = False) -> bytes:
        """The ONNX decoder of this model (all 4 outputs), exported on first use and kept in memory.
        SAM-HQ's takes ``hq_features`` (:meth:`onnx_image_input`) rather than the early ViT features.
        ``first_prompt_only``: without a correction decoder (``export_decoder``'s option), for a caller
        that sends no mask input."""
        # without a correction decoder (SAM-HQ's export has none either) both flags give one graph: one entry
        has_correction = getattr(self.model, "correction_decoder", None) is not None
        first_prompt_only = first_prompt_only and has_correction and not self.is_sam_hq
        with self._decoder_lock:
            if first_prompt_only not in self._decoders:
                from segany.export.onnx import export_decoder
                from segany.export.onnx_sam_hq import export_sam_hq_decoder

                def export(path: Path) -> Path:
                    if self.is_sam_hq:
                        return export_sam_hq_decoder(self.model, path, hq_features_input=True)
                    return export_decoder(self.model, path, first_prompt_only=first_prompt_only)

                with tempfile.TemporaryDirectory() as tmp:
                    path = self.run(lambda: export(Path(tmp) / "decoder.onnx"))
                    self._decoders[first_prompt_only] = path.read_bytes()
            return self._decoders[first_prompt_only]


def mask_record(mask: np.ndarray, score: float, fmt: str) -> dict[str, Any]:
    """One ``H x W`` bool mask -> ``{"segmentation", "score", "area", "bbox"}`` (bbox XYWH).

    ``fmt`` "rle": COCO compressed RLE; "png": ``{"png_base64": ...}`` of a 0/255 gray PNG.
    """
    rle = encode_rle(mask)
    if fmt == "png":
        png = encode_png(np.where(mask, 255, 0).astype(np.uint8))
        seg: dict[str, Any] = {"png_base64": base64.b64encode(png).decode("ascii")}
    else:
        seg = rle
    return {"segmentation": seg, "score": float(score), "area": rle_area(rle), "bbox": rle_to_bbox(rle)}
