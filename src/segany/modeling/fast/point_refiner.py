"""The point refiner at inference: the image embedding's share of its first layer made once per image, and its
MLP in bfloat16 where the hardware has bf16 arithmetic."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segany.modeling.fast.common import active, bf16_supported, layer_tensors, weights_key
from segany.modeling.point_refiner import PointRefiner, RefinerImage, map_positions


class FastPointRefiner(PointRefiner):
    """:class:`PointRefiner` that at inference samples the image embedding already multiplied by its columns of
    the MLP's first layer (``hidden`` channels instead of the embedding's: sampling is bilinear and the layer
    linear, so the two commute), made once per image and kept while the embedding and the weights are the
    same; and runs the MLP in bf16 on a device with native bf16 matmuls (up to 2,048 pixels a mask; the refined
    logits move by about 2e-2 at most from the fp32 refiner's, against edges at 0)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (weights key, first layer's weight and bias, the other layers', weak ref to an embedding, its projection)
        self._kept: tuple | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kept"] = None  # a cache (a weak reference does not pickle)
        return state

    def refined(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        image: RefinerImage,
        maps: Sequence[torch.Tensor],
        input_size: tuple[int, int],
        ys: torch.Tensor,
        xs: torch.Tensor,
        prompt: tuple[torch.Tensor | None, ...] = (None, None, None),
    ) -> torch.Tensor:
        if not active(self) or len(maps) < 2:
            return super().refined(logits, low_res, image, maps, input_size, ys, xs, prompt)
        f = self.point_features(logits, low_res, image, maps[:-1], input_size, ys, xs, prompt)
        (w1, b1), (w2, b2, w3, b3), projection = self._prepared(maps[-1])
        where = map_positions(ys, xs, input_size, logits.shape, maps[0].shape[-1])[2]
        part = F.grid_sample(projection, where, mode="bilinear", align_corners=False)[0, :, 0]
        # feature-major (hidden x N): the sampled projection adds without a transposed pass
        h = torch.add(part, torch.addmm(b1, w1, f.t().to(w1.dtype))).relu_().to(w1.dtype)
        out = torch.addmm(b3, w3, torch.addmm(b2, w2, h).relu_())[0]
        return logits[ys, xs] + out.float()

    def _prepared(self, embedding: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple, torch.Tensor]:
        """The first layer without the embedding's columns (weight, bias) and the other layers' weights and
        biases (the biases as columns), in bf16 where the device multiplies it natively; and the embedding
        ``1 x C x h x w`` times its columns of the first layer, ``1 x hidden x h x w`` (fp32). Kept while the
        weights are unchanged and, for the projection, the embedding is the same tensor."""
        params = layer_tensors(self.mlp[0], self.mlp[2], self.mlp[4])
        dtype = torch.bfloat16 if bf16_supported(embedding.device) else params[0].dtype
        key = (*weights_key(*params), dtype)
        kept = self._kept
        cols = self.map_columns(len(self.map_channels) - 1)
        if kept is None or kept[0] != key:
            w1, b1, w2, b2, w3, b3 = (p.detach().to(dtype) for p in params)
            first = (torch.cat([w1[:, : cols.start], w1[:, cols.stop :]], 1), b1[:, None])
            kept = (key, first, (w2, b2[:, None], w3, b3[:, None]), None, None)
        if kept[3] is None or kept[3]() is not embedding:
            c, h, w = embedding.shape[1:]
            weight = params[0][:, cols].detach().float()
            proj = torch.mm(weight, embedding[0].reshape(c, h * w).float()).view(1, -1, h, w)
            kept = (*kept[:3], weakref.ref(embedding), proj)
        self._kept = kept
        return kept[1], kept[2], kept[4]
