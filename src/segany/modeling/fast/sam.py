"""The Segment Anything model with its mask post-processing as matrix products at inference."""

from __future__ import annotations

import torch

from segany.modeling.fast import postprocess
from segany.modeling.sam import Sam


class FastSam(Sam):
    """:class:`Sam` whose :meth:`postprocess_masks` runs as two matrix products on a CPU at inference (same
    function; see :mod:`segany.modeling.fast.postprocess`), each mask thresholded as it is made (no
    full-size logits kept for the batch)."""

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        threshold: float | None = None,
    ) -> torch.Tensor:
        if postprocess.use_matrix_path(masks, self.image_size, original_size):
            return postprocess.postprocess_masks(masks, self.image_size, input_size, original_size, threshold=threshold)
        logits = super().postprocess_masks(masks, input_size, original_size)
        return logits if threshold is None else postprocess.greater(logits, threshold)
