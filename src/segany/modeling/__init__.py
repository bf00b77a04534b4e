"""The SAM network: segany's configs and builder, and the official ``segment_anything.modeling`` class
names (``Sam``, ``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) with their
official constructor arguments, plus MobileSAM's ``TinyViT``."""

# The SAM 2 and SAM-HQ configs register themselves on import (their modules import config.py, so config.py
# cannot import them); any import of a segany.modeling module runs this file first.
from segany.modeling import sam2_config, sam_hq  # noqa: F401
from segany.modeling.build import build_sam
from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig, get_config, list_configs
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam
from segany.modeling.tiny_vit import TinyViT
from segany.modeling.transformer import TwoWayTransformer

__all__ = [
    "Sam",
    "SamConfig",
    "ViTConfig",
    "TinyViTConfig",
    "build_sam",
    "get_config",
    "list_configs",
    "ImageEncoderViT",
    "PromptEncoder",
    "MaskDecoder",
    "TwoWayTransformer",
    "TinyViT",
]
