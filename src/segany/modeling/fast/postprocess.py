"""SAM's mask post-processing (upsample to the input size, crop the padding, resize to the original
size) as two small matrix products, for the CPU.

Both bilinear resizes are linear and separable, so their composition is ``A_h @ X @ A_w^T`` with ``A_h``
(``H x h``) and ``A_w`` (``W x w``) built by running the same two resizes on an identity matrix. Same
function as ``Sam.postprocess_masks`` (differences are float rounding, ~1e-6 of the logits' scale); on a CPU
it is faster for outputs up to several times the model input's area (several times faster up to about that
area), because the ``1024 x 1024`` intermediate map is never built: a dense product along the width on the
low-res side, then a sparse one along the height (each output row mixes 2 or 3 low-res rows). Where the two
resizes along the width are one bilinear resize of the whole low-res width (the long side of a landscape
image up to the model's size, or exactly half of it), the height goes first, on the low-res side, and the
width is one interpolation pass. Binary masks are thresholded as each one is made. For much larger outputs
the products' cost (``w x W`` per low-res row, then every output row written through a sparse product) stops
paying and the interpolations are used (see :func:`use_matrix_path`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from segany.modeling.fast.common import active
from segany.modeling.fast.workers import map_on_workers

# Fewest masks (prompts x outputs) post-processed on one-core workers (see postprocess_masks); below it
# the calling thread was faster.
MIN_MASKS_FOR_WORKERS = 16
# Largest output, in multiples of the model input's area, post-processed as matrix products (beyond it
# the two interpolations were as fast or faster: `python benchmarks/postprocess_speed.py`): boolean masks
# up to 16x (a 4000 x 3000 photo at 1024 px), float logits up to 6x.
MAX_AREA_MASKS = 16
MAX_AREA_LOGITS = 6


@functools.lru_cache(maxsize=64)
def resize_matrix(low_len: int, image_size: int, input_len: int, out_len: int) -> torch.Tensor:
    """``rows x out_len`` float32: column ``j`` holds the weights of the low-res rows in output row ``j``.

    Built by resizing an identity matrix with the same two float32 interpolations, so the weights are
    the ones ``F.interpolate`` computes. Rows of the low-res map that no output reads (they lie in the
    padding) are dropped, so ``rows`` may be less than ``low_len``.
    """
    eye = torch.eye(low_len, dtype=torch.float32)[None]  # 1 x L x L: each "channel" is one basis vector
    up = F.interpolate(eye, size=image_size, mode="linear", align_corners=False)[..., :input_len]
    m = F.interpolate(up, size=out_len, mode="linear", align_corners=False)[0]
    used = int(torch.nonzero(m.abs().sum(1)).max()) + 1
    return m[:used].contiguous()


@functools.lru_cache(maxsize=64)
def _sparse_rows(low_len: int, image_size: int, input_len: int, out_len: int) -> torch.Tensor:
    """The transpose of :func:`resize_matrix` as a sparse ``out_len x rows`` matrix: each output row reads 2
    or 3 low-res rows, so a sparse product does 1/50 of a dense one's work."""
    m = resize_matrix(low_len, image_size, input_len, out_len)
    return m.T.contiguous().to_sparse()


def use_matrix_path(
    masks: torch.Tensor, image_size: int, original_size: tuple[int, ...], thresholded: bool = False
) -> bool:
    """True where :func:`postprocess_masks` is the faster way: CPU, no autograd, and an output no larger
    than ``MAX_AREA_MASKS`` (boolean masks) or ``MAX_AREA_LOGITS`` (float logits) times the model input's
    area. A 640-px model answering a 1024 x 681 photo is 1.7 times its input."""
    limit = MAX_AREA_MASKS if thresholded else MAX_AREA_LOGITS
    return (
        masks.device.type == "cpu"
        and masks.ndim == 4
        and active()
        and int(original_size[0]) * int(original_size[1]) <= limit * image_size * image_size
    )


@functools.lru_cache(maxsize=64)
def is_one_resize(low_len: int, image_size: int, input_len: int, out_len: int) -> bool:
    """True where the two resizes along an axis are one bilinear resize of the whole low-res axis (e.g. the
    long side of an image of the model's input size: upsampled to the input, nothing cropped, resized to
    the same size): then a single ``F.interpolate`` pass computes it."""
    m = resize_matrix(low_len, image_size, input_len, out_len)
    if m.shape[0] != low_len:
        return False
    eye = torch.eye(low_len, dtype=torch.float32)[None]
    one = F.interpolate(eye, size=out_len, mode="linear", align_corners=False)[0]
    return bool(torch.allclose(m, one, rtol=0.0, atol=1e-6))


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
    ``threshold`` the boolean masks ``logits > threshold``.

    ``low_res_size``: the size of the whole low-res map when ``masks`` holds only its top-left part
    (at least the rows and columns that the input reads, as the automatic generator keeps).
    """
    b, m, h, w = masks.shape
    if low_res_size is not None:
        h, w = low_res_size
    oh, ow = int(original_size[0]), int(original_size[1])
    rh = resize_matrix(h, image_size, int(input_size[0]), oh).shape[0]  # the low-res rows read
    # Along the width either one interpolation pass (the whole low-res width) or a dense product.
    direct = is_one_resize(w, image_size, int(input_size[1]), ow)
    a_w = None if direct else resize_matrix(w, image_size, int(input_size[1]), ow)  # rw x W
    rw = w if a_w is None else a_w.shape[0]
    if masks.shape[-2] < rh or masks.shape[-1] < rw:
        raise ValueError(f"low-res logits {tuple(masks.shape[-2:])} lack rows or columns that the input reads")
    x = masks[..., :rh, :rw].float().reshape(b * m, rh, rw)
    if threshold is None:
        out = x.new_empty(b * m, oh, ow)
    else:
        out = torch.empty((b * m, oh, ow), dtype=torch.bool)
        out_np = out.numpy()
    # Masks are independent: many are shared among one-core workers. A few stay on the calling thread
    # (torch's threads): it has just run the decoder, and its OpenMP threads spin-wait for a while on the
    # cores the workers would need.
    rows = _sparse_rows(h, image_size, int(input_size[0]), oh)  # oh x rh, sparse

    def one(i: int) -> None:
        if a_w is None:  # along the height on the small side (sparse: 2 or 3 rows each), then the width
            y = F.interpolate(torch.sparse.mm(rows, x[i])[None], size=ow, mode="linear", align_corners=False)[0]
        else:  # along the width a dense product on the small side (rh x rw -> rh x W), then the sparse one
            y = torch.sparse.mm(rows, x[i] @ a_w)
        if threshold is None:
            out[i] = y
        else:  # NumPy's comparison writes the booleans (see greater)
            np.greater(y.float().numpy(), threshold, out=out_np[i])

    if b * m >= MIN_MASKS_FOR_WORKERS:
        map_on_workers(one, range(b * m), masks.device)
    else:
        for i in range(b * m):
            one(i)
    return out.view(b, m, oh, ow)
