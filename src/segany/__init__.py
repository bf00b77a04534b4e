from segany.errors import SegAnyError

__all__ = ["SegAnyError"]
__version__ = "0.1.0"
