"""Official module path ``segment_anything.utils.transforms``: :class:`ResizeLongestSide` is
segany's own (:mod:`segany.transforms`), with the official methods and arguments."""

from segany.transforms import ResizeLongestSide

__all__ = ["ResizeLongestSide"]
