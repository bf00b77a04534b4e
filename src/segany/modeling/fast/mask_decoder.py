"""The mask decoder that hands prompts without a mask input to the re-associated decoder at inference."""

from __future__ import annotations

import weakref

import torch

from segany.modeling.fast.common import active
from segany.modeling.fast.decoder import ReassociatedDecoder
from segany.modeling.mask_decoder import MaskDecoder


class FastMaskDecoder(MaskDecoder):
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
        dec = self._reassociated(image_embeddings, image_pe, dense_prompt_embeddings)
        if dec is None:
            return super().forward(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
            )
        which = list(range(1, self.num_mask_tokens)) if multimask_output else [0]
        iou, _kept, low = dec.decode(sparse_prompt_embeddings, which, 0.0)
        return low.view(iou.shape[0], len(which), *low.shape[-2:]), iou

    def _reassociated(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> ReassociatedDecoder | None:
        """The re-associated decoder when it applies: inference, one image embedding, and one dense
        embedding for every pixel and prompt (no mask input). Its per-image part is kept for the next
        call with the same embedding tensor (unchanged since: same version; inference-mode tensors have no
        version counter, and the predictor never writes into its embedding) and positional encoding.
        """
        if not active(self):
            return None
        if image_embeddings.shape[0] != 1 or dense.ndim != 4 or dense.stride(-1) or dense.stride(-2):
            return None
        if dense.shape[0] > 1 and dense.stride(0):
            return None  # a different dense embedding per prompt
        if not ReassociatedDecoder.supports(self):
            return None
        vec = dense[0, :, 0, 0]
        version = None if image_embeddings.is_inference() else image_embeddings._version
        c = self._reassociated_cache
        if (
            c is not None
            and c[0]() is image_embeddings
            and c[1] == version
            and (c[2] is image_pe or torch.equal(c[2], image_pe))
            and torch.equal(c[3], vec)
        ):
            return c[4]
        dec = ReassociatedDecoder(self, image_embeddings, vec, image_pe)
        self._reassociated_cache = (weakref.ref(image_embeddings), version, image_pe, vec, dec)
        return dec
