"""Resizing to the model's input frame: the one place that maps images, points and boxes.

SAM resizes the longest side to the model size (keeping the aspect ratio) and pads bottom/right.
Images are resized with PIL's bilinear filter, exactly as the official code does (through
torchvision's PIL path), so the same weights give the same embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so the longest side equals ``long_side_length``."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    # max(1, ...): a very thin image must not collapse to zero pixels.
    return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))


class ResizeLongestSide:
    """Resize images, coordinates and boxes so the longest side is ``target_length``."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> ``h x w x 3`` uint8."""
        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 2`` (x, y) in the original frame -> the resized frame (float)."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 4`` XYXY boxes -> the resized frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` float -> resized (bilinear, antialiased), for batched tensor pipelines."""
        h, w = get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


class ResizeSquare:
    """SAM 2's input frame: the image is stretched to ``size x size`` (no aspect ratio kept, no padding);
    same interface as :class:`ResizeLongestSide`."""

    def __init__(self, size: int) -> None:
        self.target_length = size

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> ``size x size x 3`` float32 in [0, 255] (bilinear, antialiased, on floats:
        ``torchvision.transforms.Resize`` on the tensor image, as SAM 2)."""
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        return self.apply_image_torch(x)[0].permute(1, 2, 0).numpy()

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 2`` (x, y) in the original frame -> the stretched frame (float)."""
        old_h, old_w = original_size
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] = coords[..., 0] / old_w * self.target_length
        coords[..., 1] = coords[..., 1] / old_h * self.target_length
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` float -> ``B x 3 x size x size``."""
        size = (self.target_length, self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        old_h, old_w = original_size
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] / old_w * self.target_length
        coords[..., 1] = coords[..., 1] / old_h * self.target_length
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.target_length, self.target_length


def transform_for(model) -> ResizeLongestSide | ResizeSquare:
    """The input frame of ``model``: stretched to a square for SAM 2 (``resize_mode == "stretch"``),
    longest side resized (then padded) otherwise."""
    if getattr(model, "resize_mode", "longest_side") == "stretch":
        return ResizeSquare(model.image_size)
    return ResizeLongestSide(model.image_size)
