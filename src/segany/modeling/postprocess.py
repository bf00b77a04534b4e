"""SAM's mask post-processing (upsample to the input size, crop the padding, resize to the original
size) as two small matrix products, for the CPU.

Both bilinear resizes are linear and separable, so their composition is ``A_h @ X @ A_w^T`` with
``A_h`` (``H x h``) and ``A_w`` (``W x w``) built by running the same two resizes on an identity
matrix. Same function as ``Sam.postprocess_masks`` (differences are float rounding, ~1e-6 of the
logits' scale); on a CPU it is about 5x faster for output sizes up to the model's input size, because
the ``1024 x 1024`` intermediate map is never built: a dense product along the width on the low-res
side, then a sparse one along the height (each output row mixes 2 or 3 low-res rows). For larger
outputs the dense product's cost (``w x W`` per low-res row) stops paying and the interpolations
are used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from segany.modeling.common import eager_inference
from segany.modeling.workers import map_on_workers


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
    """The transpose of :func:`resize_matrix` as a sparse ``out_len x rows`` matrix: each output row reads
    2 or 3 low-res rows, so a sparse product does 1/50 of a dense one's work."""
    return resize_matrix(low_len, image_size, input_len, out_len).T.contiguous().to_sparse()


def use_matrix_path(masks: torch.Tensor, image_size: int, original_size: tuple[int, ...]) -> bool:
    """True where :func:`postprocess_masks` is the faster way (CPU, no autograd, output no larger than
    the model input)."""
    return (
        masks.device.type == "cpu"
        and masks.ndim == 4
        and eager_inference()
        and int(original_size[0]) * int(original_size[1]) <= image_size * image_size
    )


def postprocess_masks(
    masks: torch.Tensor,
    image_size: int,
    input_size: tuple[int, ...],
    original_size: tuple[int, ...],
    low_res_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``B x M x h x w`` low-res logits -> ``B x M x H x W`` float32 logits in the original frame.

    ``low_res_size``: the size of the whole low-res map when ``masks`` holds only its top-left part
    (at least the rows and columns that the input reads, as the automatic generator keeps).
    """
    b, m, h, w = masks.shape
    if low_res_size is not None:
        h, w = low_res_size
    oh, ow = int(original_size[0]), int(original_size[1])
    a_w = resize_matrix(w, image_size, int(input_size[1]), ow)  # rw x W
    rows = _sparse_rows(h, image_size, int(input_size[0]), oh)  # H x rh, sparse
    if masks.shape[-2] < rows.shape[1] or masks.shape[-1] < a_w.shape[0]:
        raise ValueError(f"low-res logits {tuple(masks.shape[-2:])} lack rows or columns that the input reads")
    x = masks[..., : rows.shape[1], : a_w.shape[0]].float().reshape(b * m, rows.shape[1], a_w.shape[0])
    out = x.new_empty(b * m, oh, ow)

    def one(i: int) -> None:
        # Along the width a dense product on the small side (rh x rw -> rh x W), then the sparse one.
        out[i] = torch.sparse.mm(rows, x[i] @ a_w)

    map_on_workers(one, range(b * m), masks.device)  # masks are independent: one-core workers
    return out.view(b, m, oh, ow)
