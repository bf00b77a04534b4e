from segany.automatic.generator import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
