"""The prompt encoders with their positional encoding kept between calls at inference."""

from __future__ import annotations

import weakref

import torch

from segany.modeling.dense_prompt_encoder import DensePromptEncoder
from segany.modeling.fast.common import active, weights_key
from segany.modeling.fast.dense_cells import DenseCells, cell_size, click_cells, constant_dense
from segany.modeling.prompt_encoder import PromptEncoder


class KeptDensePE:
    """Mixin for a :class:`PromptEncoder`: :meth:`get_dense_pe` returns the same tensor again at inference
    while the Gaussian matrix is unchanged: the encoding is the same for every prompt, and the fast mask
    decoder recognises it (its per-model products of the encoding are kept while it is the same tensor)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_dense_pe"] = None  # only a cache
        return state

    def get_dense_pe(self) -> torch.Tensor:
        if not active():
            return super().get_dense_pe()
        m = self.pe_layer.positional_encoding_gaussian_matrix
        key = (*weights_key(m), tuple(self.image_embedding_size))
        cached = self._dense_pe
        if cached is None or cached[0] != key:
            # Contiguous: the encoding is made channels-last and permuted; every image's decoder reads it.
            pe = super().get_dense_pe().contiguous()
            cached = self._dense_pe = (key, pe)
        return cached[1]


class FastPromptEncoder(KeptDensePE, PromptEncoder):
    """:class:`PromptEncoder` with its positional encoding kept (:class:`KeptDensePE`)."""


class FastDensePromptEncoder(KeptDensePE, DensePromptEncoder):
    """:class:`DensePromptEncoder` (segany's default model) with its positional encoding kept, and at
    inference the dense embedding of clicks alone (no box, no mask input) built from the few cells the
    clicks touch (:func:`~segany.modeling.fast.dense_cells.click_cells`) on the per-image vector, rather than
    from maps of the whole grid; the fast mask decoder takes those cells back (:meth:`cells_of`) instead of
    finding them by comparing every cell."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clicks: tuple | None = None  # (weak ref to the last dense embedding of clicks, vector, cells)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_clicks"] = None  # a weak reference does not pickle; it is only a cache
        return state

    def dense_embedding(  # DensePromptEncoder's, for clicks alone cell by cell
        self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
        masks: torch.Tensor | None, bs: int, has_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._clicks = None
        if (
            not active(self)
            or points is None
            or boxes is not None
            or masks is not None
            or points[1].shape[0] != bs
            or cell_size(self) is None
            or bool((points[1] > 1).any())
        ):
            return super().dense_embedding(points, boxes, masks, bs, has_mask)
        cells = click_cells(self, points)
        vec = constant_dense(self)
        h, w = self.image_embedding_size
        index = cells.index[:, None, :].expand(-1, vec.shape[0], -1)
        dense = vec[None, :, None].repeat(bs, 1, h * w).scatter_add_(2, index, cells.delta.transpose(1, 2))
        dense = dense.view(bs, -1, h, w)
        self._clicks = (weakref.ref(dense), vec, cells)
        return dense

    def cells_of(self, dense: torch.Tensor) -> tuple[torch.Tensor, DenseCells] | None:
        """The per-image vector and the clicks' cells of ``dense`` when it is this encoder's last dense
        embedding of clicks (the same inference tensor: like the decoder's per-image cache, this trusts that
        nobody writes into it in between, as the predictor never does), else None."""
        kept = self._clicks
        if kept is None or kept[0]() is not dense or not dense.is_inference():
            return None
        return kept[1], kept[2]
