"""The mask decoder that hands prompts without a mask input (and, for a model that draws clicks into its
dense embedding, clicks) to the re-associated decoder at inference."""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.fast.common import active
from segany.modeling.fast.decoder import ReassociatedDecoder, per_image_decoder
from segany.modeling.fast.dense_cells import DenseCells, cell_size, constant_dense
from segany.modeling.mask_decoder import MaskDecoder

# Most cells of a prompt's dense embedding that may differ from the per-image vector for the
# re-associated path (a click touches at most 3 x 3); a box or a mask input changes far more, and the
# plain decoder is then the faster one.
MAX_DENSE_CELLS = 64
# A cell equals the per-image vector when it is within this of it (relative to the vector's largest
# entry): the downscaler run on whole maps rounds differently from the same run on one zero patch (~2e-7).
DENSE_CELL_TOL = 1e-5


class DenseCellsDecoder(nn.Module):
    """What a fast mask decoder needs to decode clicks that are drawn into the dense embedding through its
    re-associated decoder: the prompt encoder that draws them (:meth:`use_dense_cells`) and, for a call,
    the per-image dense vector and the prompts' differing cells (:meth:`dense_parts`). A mixin of
    :class:`FastMaskDecoder` and SAM 2's :class:`~segany.modeling.fast.sam2_decoder.FastSam2MaskDecoder`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Not a submodule: the prompt encoder belongs to the model, and the state dict stays the plain one.
        object.__setattr__(self, "_dense_source", None)

    def use_dense_cells(self, prompt_encoder: nn.Module) -> None:
        """Decode point prompts of ``prompt_encoder`` (one that draws clicks into its dense embedding, cell
        by cell: :mod:`~segany.modeling.fast.dense_cells`) through the re-associated decoder too."""
        if getattr(prompt_encoder, "dense_prompts", False) and cell_size(prompt_encoder) is not None:
            object.__setattr__(self, "_dense_source", prompt_encoder)

    def dense_parts(self, dense: torch.Tensor) -> tuple[torch.Tensor, DenseCells | None] | None:
        """``dense`` (``B x C x h x w``) as the per-image vector and each prompt's cells that differ from it
        (None: one vector for every pixel and prompt); None where the re-associated decoder does not apply
        (a mask input, a box, or more than :data:`MAX_DENSE_CELLS` cells)."""
        if dense.ndim != 4:
            return None
        if self._dense_source is not None:
            kept = getattr(self._dense_source, "cells_of", lambda _: None)(dense)  # clicks it drew cell by cell
            if kept is not None:
                return None if kept[1].index.shape[1] > MAX_DENSE_CELLS else kept
            vec = constant_dense(self._dense_source)
            cells = _differing_cells(dense, vec)
            return None if cells is None else (vec, cells)
        if dense.stride(-1) or dense.stride(-2) or (dense.shape[0] > 1 and dense.stride(0)):
            return None  # a dense embedding that differs from pixel to pixel or from prompt to prompt
        return dense[0, :, 0, 0], None


class FastMaskDecoder(DenseCellsDecoder, MaskDecoder):
    """:class:`MaskDecoder` that decodes through :class:`ReassociatedDecoder` (same outputs, a fraction of
    the work) where it applies; the plain forward everywhere else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (weak ref to the image embedding, its version, image_pe, dense vector, decoder): see _reassociated.
        self._reassociated_cache: tuple | None = None
        # (weak ref to the positional encoding, {key: product}): see ReassociatedDecoder.pe_products.
        self._pe_products: tuple | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reassociated_cache"] = None  # a weak reference does not pickle; it is only a cache
        state["_pe_products"] = None
        return state

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._reassociated(image_embeddings, image_pe, dense_prompt_embeddings)
        if found is None:
            return super().forward(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
            )
        dec, cells = found
        which = list(range(1, self.num_mask_tokens)) if multimask_output else [0]
        iou, _kept, low = dec.decode(sparse_prompt_embeddings, which, 0.0, cells=cells)
        return low.view(iou.shape[0], len(which), *low.shape[-2:]), iou

    def _reassociated(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> tuple[ReassociatedDecoder, DenseCells | None] | None:
        """The re-associated decoder when it applies: inference, one image embedding, and a dense embedding
        that :meth:`dense_parts` splits. Its per-image part is kept for the next call on the same image
        (:func:`per_image_decoder`).
        """
        if not active(self) or image_embeddings.shape[0] != 1 or not ReassociatedDecoder.supports(self):
            return None
        parts = self.dense_parts(dense)  # after the cheap checks: it compares the prompts' cells
        if parts is None:
            return None
        vec, cells = parts
        dec = per_image_decoder(
            self, image_embeddings, image_pe, vec, lambda: ReassociatedDecoder(self, image_embeddings, vec, image_pe)
        )
        return dec, cells


def _differing_cells(dense: torch.Tensor, vec: torch.Tensor) -> DenseCells | None:
    """The cells of ``dense`` (``B x C x h x w``) that differ from ``vec`` (``C``), as :class:`DenseCells`;
    None where a prompt has more than :data:`MAX_DENSE_CELLS` of them."""
    b, c = dense.shape[:2]
    diff = (dense - vec[None, :, None, None]).flatten(2).transpose(1, 2)  # B x N x C
    touched = diff.abs().amax(-1) > DENSE_CELL_TOL * max(1.0, float(vec.abs().max()))  # B x N
    counts = touched.sum(1)
    k = int(counts.max()) if b else 0
    if k > MAX_DENSE_CELLS:
        return None
    order = torch.sort(touched.to(torch.uint8), dim=1, descending=True, stable=True)[1][:, :k]
    valid = torch.arange(k, device=dense.device)[None] < counts[:, None]
    index = order * valid  # padding rows at token 0, with a zero difference
    delta = diff.gather(1, order[:, :, None].expand(-1, -1, c)) * valid[:, :, None]
    return DenseCells(index, delta)
