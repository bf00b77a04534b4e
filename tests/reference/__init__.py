"""Test-only harness: the reference SAM / MobileSAM packages (with torchvision / timm stand-ins),
reference models with random weights, and checkpoints in the official layouts."""

from .builders import (
    build_reference_tiny_vit,
    build_reference_vit,
    randomize_,
    save_official_checkpoint,
)
from .shim import batched_nms, box_area, import_mobile_sam, import_reference, nms

__all__ = [
    "batched_nms",
    "box_area",
    "build_reference_tiny_vit",
    "build_reference_vit",
    "import_mobile_sam",
    "import_reference",
    "nms",
    "randomize_",
    "save_official_checkpoint",
]
