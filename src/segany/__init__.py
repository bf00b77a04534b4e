"""segany: Segment Anything, from scratch.

The official ``segment_anything`` names are here under the same module paths (``segany.build_sam``,
``segany.predictor``, ``segany.automatic_mask_generator``, ``segany.modeling``, ``segany.utils.transforms``,
``segany.utils.amg``, ``segany.utils.onnx``), so official code runs by changing its import.
"""

from segany.automatic import SamAutomaticMaskGenerator
from segany.build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.modeling import Sam, SamConfig, get_config
from segany.predictor import SamPredictor

__all__ = [
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "load_model",
    "save_model",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "sam_model_registry",
    "get_config",
    "Sam",
    "SamConfig",
    "SegAnyError",
]
__version__ = "0.1.0"
