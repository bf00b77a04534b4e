"""SAM's mask post-processing (upsample to the input size, crop the padding, resize to the original
size) by OpenCV's resizes, for the CPU.

The same two bilinear resizes as ``Sam.postprocess_masks`` (half-pixel centres, edges replicated: OpenCV's
``INTER_LINEAR`` maps pixels as ``F.interpolate(..., align_corners=False)`` does; the differences are float
rounding: OpenCV places the source pixels in double precision, torch in float, so the logits differ by up to
about 5e-5 of their scale where a resize's factor is not a power of two), with less work: the first resize
reads only the low-res rows and columns that the crop keeps, so the padded ``4h x 4w`` map is never built, and
OpenCV's resize is a few times faster than torch's interpolation on this kind of CPU
(``python benchmarks/postprocess_speed.py``).
Binary masks are thresholded as each one is made.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from segany.modeling.fast.common import active
from segany.modeling.fast.workers import map_on_workers
from segany.modeling.low_res import low_res_rows

# Fewest masks (prompts x outputs) post-processed on one-core workers (see postprocess_masks); below it
# the calling thread was faster.
MIN_MASKS_FOR_WORKERS = 16


def use_fast_path(masks: torch.Tensor) -> bool:
    """True where :func:`postprocess_masks` replaces the interpolations: ``B x M x h x w`` logits on the CPU,
    with no autograd."""
    return masks.device.type == "cpu" and masks.ndim == 4 and active()


def greater(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x > threshold`` as booleans; on a CPU through NumPy (its comparison was faster here than torch's
    comparison to bool)."""
    if x.device.type != "cpu" or x.requires_grad or x.dtype != torch.float32:
        return x > threshold
    return torch.from_numpy(np.greater(x.contiguous().numpy(), threshold))


def postprocess_masks(
    masks: torch.Tensor,
    image_size: int,
    input_size: tuple[int, ...],
    original_size: tuple[int, ...],
    low_res_size: tuple[int, int] | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """``B x M x h x w`` low-res logits -> ``B x M x H x W`` float32 logits in the original frame, or with
    ``threshold`` the boolean masks ``logits > threshold``. ``image_size`` is the padded input's side, a
    whole multiple of the low-res map's (SAM's is 4; 1 where the low-res map is the input, as SAM 2's
    post-processing has it).

    ``low_res_size``: the size of the whole low-res map when ``masks`` holds only its top-left part
    (at least the rows and columns that the input reads, as the automatic generator keeps).
    """
    b, m, h, w = masks.shape
    if low_res_size is not None:
        h, w = low_res_size
    factor, rest = divmod(image_size, h)
    if rest or image_size != factor * w:
        raise ValueError(f"input side {image_size} is not a whole multiple of the low-res map's {(h, w)}")
    (ih, iw), (oh, ow) = (int(s) for s in input_size), (int(s) for s in original_size)
    rh, rw = low_res_rows(ih, h, image_size), low_res_rows(iw, w, image_size)
    if masks.shape[-2] < rh or masks.shape[-1] < rw:
        raise ValueError(f"low-res logits {tuple(masks.shape[-2:])} lack rows or columns that the input reads")
    x = masks[..., :rh, :rw].float().reshape(b * m, rh, rw).contiguous().numpy()
    if threshold is None:
        out = torch.empty((b * m, oh, ow), dtype=torch.float32)
    else:
        out = torch.empty((b * m, oh, ow), dtype=torch.bool)
    out_np = out.numpy()

    def one(i: int) -> None:
        # the rows and columns read, upsampled (their last ones past the crop only), cropped to the input
        up = x[i] if factor == 1 else cv2.resize(x[i], (rw * factor, rh * factor), interpolation=cv2.INTER_LINEAR)
        up = up[:ih, :iw]
        if threshold is None and (ih, iw) != (oh, ow):
            cv2.resize(up, (ow, oh), dst=out_np[i], interpolation=cv2.INTER_LINEAR)
            return
        y = up if (ih, iw) == (oh, ow) else cv2.resize(up, (ow, oh), interpolation=cv2.INTER_LINEAR)
        if threshold is None:
            out_np[i] = y
        else:  # NumPy's comparison writes the booleans (see greater)
            np.greater(y, threshold, out=out_np[i])

    # Masks are independent: many are shared among one-core workers. A few stay on the calling thread: it has
    # just run the decoder, and torch's OpenMP threads spin-wait for a while on the cores the workers would need.
    if b * m >= MIN_MASKS_FOR_WORKERS:
        map_on_workers(one, range(b * m), masks.device)
    else:
        for i in range(b * m):
            one(i)
    return out.view(b, m, oh, ow)
