from segany.modeling.build import build_sam
from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig, get_config, list_configs
from segany.modeling.sam import Sam

__all__ = ["Sam", "SamConfig", "ViTConfig", "TinyViTConfig", "build_sam", "get_config", "list_configs"]
