"""The Segment Anything model with its mask post-processing by OpenCV's resizes at inference."""

from __future__ import annotations

import torch

from segany.modeling.fast import postprocess
from segany.modeling.fast.mask_decoder import DenseCellsDecoder
from segany.modeling.sam import Sam, interpolate_masks


class FastSam(Sam):
    """:class:`Sam` whose :meth:`postprocess_masks` runs as OpenCV's resizes on a CPU at inference (same
    function; see :mod:`segany.modeling.fast.postprocess`), each mask thresholded as it is made (no
    full-size logits kept for the batch). The logits may be only the top-left part of the low-res map (the
    rows and columns the input reads, as the re-associated decoder makes them:
    :func:`~segany.modeling.low_res.low_res_rows`). A prompt encoder that draws clicks into the dense
    embedding is introduced to its fast mask decoder
    (:class:`~segany.modeling.fast.mask_decoder.DenseCellsDecoder`), which then decodes clicks through the
    re-associated decoder too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.mask_decoder, DenseCellsDecoder):
            self.mask_decoder.use_dense_cells(self.prompt_encoder)

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        threshold: float | None = None,
    ) -> torch.Tensor:
        full = tuple(self.prompt_encoder.mask_input_size)
        if postprocess.use_fast_path(masks):
            return postprocess.postprocess_masks(
                masks, self.image_size, input_size, original_size, full, threshold=threshold
            )
        if tuple(masks.shape[-2:]) == full:
            logits = super().postprocess_masks(masks, input_size, original_size)
        else:  # a top-left part: the same exact-factor upsampling, crop and resize, without the padding's pixels
            f = self.image_size // full[0]
            logits = interpolate_masks(masks, (masks.shape[-2] * f, masks.shape[-1] * f), input_size, original_size)
        return logits if threshold is None else postprocess.greater(logits, threshold)
