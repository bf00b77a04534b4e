"""Official module path ``segment_anything.automatic_mask_generator``: segany's
:class:`~segany.automatic.generator.SamAutomaticMaskGenerator` (official arguments and records)."""

from segany.automatic.generator import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
