"""The point refiner's MLP in bfloat16 at inference, where the hardware has bf16 arithmetic."""

from __future__ import annotations

import torch

from segany.modeling.fast.common import active, bf16_supported
from segany.modeling.point_refiner import PointRefiner


class FastPointRefiner(PointRefiner):
    """:class:`PointRefiner` whose MLP runs under bf16 autocast at inference on a device with native bf16
    matmuls (up to 2,048 pixels x 330 features a mask; the refined logits move by about 1e-2 at most, against edges
    at 0)."""

    def correct(self, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        if not (active(self) and bf16_supported(features.device)):
            return super().correct(features, coarse)
        with torch.autocast(features.device.type, dtype=torch.bfloat16):
            return coarse + self.mlp(features).squeeze(-1).float()
