"""OnnxSamPredictor: the :class:`segany.predictor.SamPredictor` API on two exported ONNX models.

Runs with onnxruntime only (no torch model in memory): ``export_encoder`` gives the image encoder,
``export_decoder`` the prompt side. The input size and normalization are read from the files' metadata.
Prompts are validated exactly as in ``SamPredictor`` (the same helper), and mapped with the same
``ResizeLongestSide``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from segany.errors import SegAnyError
from segany.export.onnx import DECODER_INPUTS, ENCODER_INPUT, read_metadata
from segany.export.onnx_sam2 import SAM2_DECODER_INPUTS
from segany.prompts import check_prompts
from segany.transforms import ResizeLongestSide, get_preprocess_shape

#: The decoder inputs a SAM with high-resolution features adds after ``image_embeddings``.
HIGH_RES_INPUTS = SAM2_DECODER_INPUTS[1:3]


def _session(path: str | os.PathLike, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SegAnyError("the ONNX predictor needs onnxruntime: pip install 'segany[onnx]'") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # No spin-waiting between runs: spinning threads hold the cores that everything else in the process
    # (and on a small or shared machine, other processes) needs next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise SegAnyError(f"{path}: cannot load the ONNX model ({e})") from None


class OnnxSamPredictor:
    """``set_image`` once, ``predict`` many times, with onnxruntime.

    Args:
        encoder_path: an ``export_encoder`` file (input ``image``, preprocessed ``1 x 3 x S x S``); None for
            a decoder alone, given embeddings computed elsewhere with :meth:`set_embedding`.
        decoder_path: an ``export_decoder`` file (the official decoder interface).
        threads: onnxruntime intra-op threads (None: its default).
    """

    def __init__(
        self, encoder_path: str | os.PathLike | None, decoder_path: str | os.PathLike, threads: int | None = None
    ):
        described = encoder_path if encoder_path is not None else decoder_path
        meta = read_metadata(described)
        if "segany_image_size" not in meta:
            raise SegAnyError(f"{described}: no segany metadata; export it with `segany export-onnx`")
        self.image_size = int(meta["segany_image_size"])
        self.pixel_mean = np.array(json.loads(meta["segany_pixel_mean"]), dtype=np.float32).reshape(1, 1, 3)
        self.pixel_std = np.array(json.loads(meta["segany_pixel_std"]), dtype=np.float32).reshape(1, 1, 3)
        self.mask_threshold = float(meta.get("segany_mask_threshold", 0.0))
        decoder_meta = read_metadata(decoder_path)
        self.single_mask_decoder = decoder_meta.get("segany_return_single_mask") == "1"
        self.encoder = _session(encoder_path, threads) if encoder_path is not None else None
        self.decoder = _session(decoder_path, threads)
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        names = list(inputs)
        # A SAM with SAM 2's high-resolution features (segany_family sam_high_res) also takes the two maps
        # its encoder returns; SAM 2 itself stretches the image, which this predictor does not.
        extra = HIGH_RES_INPUTS if decoder_meta.get("segany_family") == "sam_high_res" else []
        if names != DECODER_INPUTS[:1] + extra + DECODER_INPUTS[1:]:
            raise SegAnyError(f"{decoder_path}: inputs {names}, expected the SAM decoder's {DECODER_INPUTS}")
        self.image_input_names = extra
        self.low_res_side = int(inputs["mask_input"].shape[-1])
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: np.ndarray | None = None
        self.image_inputs: dict[str, np.ndarray] = {}
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> ``1 x 3 x S x S`` float32 (resized, normalized, zero-padded), as
        ``Sam.preprocess`` after ``ResizeLongestSide.apply_image``."""
        resized = self.transform.apply_image(np.ascontiguousarray(image)).astype(np.float32)
        x = (resized - self.pixel_mean) / self.pixel_std
        out = np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32)
        out[0, :, : x.shape[0], : x.shape[1]] = x.transpose(2, 0, 1)
        return out

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an ``H x W x 3`` uint8 image (``image_format`` "RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise SegAnyError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegAnyError(f"image must be an H x W x 3 uint8 array, got {getattr(image, 'shape', None)}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise SegAnyError(f"image has no pixels: shape {image.shape}")
        if image_format == "BGR":
            image = image[..., ::-1]
        if self.encoder is None:
            raise SegAnyError("this predictor has no encoder: give embeddings with set_embedding")
        outputs = self.encoder.run(None, {ENCODER_INPUT: self.preprocess(image)})
        names = [o.name for o in self.encoder.get_outputs()]
        self.set_embedding(outputs[0], image.shape[:2], dict(zip(names[1:], outputs[1:])))

    def set_embedding(
        self, embedding: np.ndarray, original_size: tuple[int, int], image_inputs: dict[str, np.ndarray] | None = None
    ) -> None:
        """Reuse a ``1 x C x h x w`` float32 embedding computed elsewhere (e.g. by the torch encoder), with
        the decoder's other image inputs by name where it has them (``high_res_feats_0`` / ``_1``)."""
        missing = [n for n in self.image_input_names if n not in (image_inputs or {})]
        if missing:
            raise SegAnyError(f"this decoder also needs the image's {', '.join(missing)}")
        self.reset_image()
        self.image_inputs = {n: np.ascontiguousarray(image_inputs[n], dtype=np.float32) for n in self.image_input_names}
        self.features = np.ascontiguousarray(embedding, dtype=np.float32)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = get_preprocess_shape(*self.original_size, self.image_size)
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The ``1 x C x h x w`` embedding of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return self.features

    def decoder_inputs(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The decoder's feed for one prompt set (pixel coordinates of the original image)."""
        side = self.low_res_side
        pts, labs, b, m = check_prompts(point_coords, point_labels, box, mask_input, (side, side))
        coords = pts if pts is not None else np.zeros((0, 2))
        labels = labs if labs is not None else np.zeros((0,))
        if b is not None:
            coords = np.concatenate([coords, b.reshape(2, 2)])
            labels = np.concatenate([labels, [2, 3]])
        else:
            # No box: one padding point, as SAM was trained (and as the torch prompt encoder does).
            coords = np.concatenate([coords, [[0.0, 0.0]]])
            labels = np.concatenate([labels, [-1]])
        coords = self.transform.apply_coords(coords, self.original_size)  # (0, 0) padding stays at the origin
        if m is not None:
            mask, has_mask = m[None].astype(np.float32), np.ones(1, np.float32)
        else:
            mask, has_mask = np.zeros((1, 1, side, side), np.float32), np.zeros(1, np.float32)
        return {
            "image_embeddings": self.features,
            **self.image_inputs,
            "point_coords": coords[None].astype(np.float32),
            "point_labels": labels[None].astype(np.float32),
            "mask_input": mask,
            "has_mask_input": has_mask,
            "orig_im_size": np.array(self.original_size, dtype=np.float32),
        }

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set, as ``SamPredictor.predict``.

        Returns:
            masks ``C x H x W`` (bool, or float logits), iou_predictions ``C``, low_res_logits
            ``C x 4h x 4w``; C = 3 with ``multimask_output`` else 1 (always 1 for a single-mask export).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        feed = self.decoder_inputs(point_coords, point_labels, box, mask_input)
        masks, iou, low_res = self.decoder.run(None, feed)
        if not self.single_mask_decoder:
            sl = slice(1, None) if multimask_output else slice(0, 1)
            masks, iou, low_res = masks[:, sl], iou[:, sl], low_res[:, sl]
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks[0], iou[0], low_res[0]
