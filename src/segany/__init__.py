"""segany: Segment Anything, from scratch."""

from segany.automatic import SamAutomaticMaskGenerator
from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.modeling import Sam, SamConfig, build_sam, get_config
from segany.predictor import SamPredictor

__all__ = [
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "load_model",
    "save_model",
    "build_sam",
    "get_config",
    "Sam",
    "SamConfig",
    "SegAnyError",
]
__version__ = "0.1.0"
