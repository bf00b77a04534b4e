"""The prompt encoders with their positional encoding kept between calls at inference."""

from __future__ import annotations

import torch

from segany.modeling.dense_prompt_encoder import DensePromptEncoder
from segany.modeling.fast.common import active
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
        version = None if m.is_inference() else m._version
        key = (m.data_ptr(), version, m.device, m.dtype, tuple(self.image_embedding_size))
        key += (torch.is_inference_mode_enabled(),)
        cached = self._dense_pe
        if cached is None or cached[0] != key:
            # Contiguous: the encoding is made channels-last and permuted; every image's decoder reads it.
            pe = super().get_dense_pe().contiguous()
            cached = self._dense_pe = (key, pe)
        return cached[1]


class FastPromptEncoder(KeptDensePE, PromptEncoder):
    """:class:`PromptEncoder` with its positional encoding kept (:class:`KeptDensePE`)."""


class FastDensePromptEncoder(KeptDensePE, DensePromptEncoder):
    """:class:`DensePromptEncoder` (segany's default model) with its positional encoding kept."""
