"""A least-recently-used map bounded by bytes, and the per-image entry the server keeps in it.

The server computes an image's embedding once and answers every later prompt from here; the bound is on
the bytes held (embedding + encoded image; refinement logits and zoom-in's crop embeddings in their own
bounded stores), not on a count, so the server's memory stays flat however many images come in.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from segany.modeling.point_refiner import RefinerImage
from segany.zoom_in import Box, CropEmbedding

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Thread-safe LRU map whose values declare their size; inserting evicts the oldest until it fits.

    An item larger than the whole budget is still kept (alone): refusing it would make that image
    unusable, and the budget is then exceeded by one item at most.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> V | None:
        """The value (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V, nbytes: int) -> list[str]:
        """Insert or replace ``key``; returns the keys evicted to make room."""
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._items and self._bytes + nbytes > self.max_bytes:
                k, (_v, n) = self._items.popitem(last=False)
                self._bytes -= n
                evicted.append(k)
            self._items[key] = (value, int(nbytes))
            self._bytes += int(nbytes)
            self.evictions += len(evicted)
        return evicted

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def keys(self) -> list[str]:
        """Keys from the least to the most recently used."""
        with self._lock:
            return list(self._items)


@dataclass
class ImageEntry:
    """One uploaded image: its bytes (for saving annotations), size, and embedding.

    Attributes:
        data: the uploaded file, unchanged. ext: its format's file suffix (".jpg", ".png", ...).
        height, width: of the decoded, upright image. input_size: ``(h, w)`` after ResizeLongestSide.
        embedding: ``1 x C x e x e`` float32 (CPU). text_features: for a model with a text head.
    """

    image_id: str
    data: bytes
    ext: str
    height: int
    width: int
    input_size: tuple[int, int]
    embedding: torch.Tensor
    text_features: tuple[torch.Tensor, ...] | None = None  #: the text head's pixel features, if any
    #: The decoder's other image inputs (SAM 2's high-resolution features, SAM-HQ's early ViT features).
    decoder_inputs: dict[str, Any] | None = None
    #: what the model's point refiner reads of the image (``SamPredictor.get_refiner_image``), if it has one
    refiner_image: RefinerImage | None = None

    @property
    def nbytes(self) -> int:
        """Bytes to count in the cache."""
        return len(self.data) + tensor_bytes(
            self.embedding, *(self.text_features or ()), self.decoder_inputs or {}, self.refiner_image
        )


class LogitsStore:
    """Low-res logits of earlier predictions, by handle, for refinement ("mask_input").

    One byte-bounded LRU for all images (not a quota per image), so many clients prompting the same
    image each keep their recent handles. Stored as float16: they only feed the mask downscaler, and
    half the bytes means twice the handles.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[tuple[str, np.ndarray, Box | None]] = ByteLRU(max_bytes)

    def add(self, image_id: str, logits: np.ndarray, crop: Box | None = None) -> str:
        """Keep one ``4e x 4e`` logits map of ``image_id``, predicted on the whole image or on ``crop``
        (zoom-in: ``x0, y0, x1, y1`` pixels); returns its handle."""
        handle = secrets.token_hex(8)
        arr = np.ascontiguousarray(logits, dtype=np.float16)
        self._lru.put(handle, (image_id, arr, crop), arr.nbytes + 96)
        return handle

    def get(self, image_id: str, handle: str) -> tuple[np.ndarray, Box | None] | None:
        """The ``4e x 4e`` float32 logits and their crop (None: the whole image), or None when unknown,
        expired or of another image."""
        item = self._lru.get(handle)
        if item is None or item[0] != image_id:
            return None
        return item[1].astype(np.float32), item[2]

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes


class CropEmbeddings:
    """Zoom-in's crop embeddings of one image, kept in a byte-bounded LRU shared by all images
    (:class:`segany.zoom_in.CropCache`): a click that keeps its crop costs no embedding."""

    def __init__(self, lru: ByteLRU[CropEmbedding], image_id: str) -> None:
        self._lru, self._image_id = lru, image_id

    def _key(self, crop: Box) -> str:
        return f"{self._image_id}:{','.join(str(int(v)) for v in crop)}"

    def get(self, crop: Box) -> CropEmbedding | None:
        return self._lru.get(self._key(crop))

    def put(self, crop: Box, value: CropEmbedding) -> None:
        embedding, original_size, input_size, inputs, refiner_image = value
        embedding, inputs = cpu_copy(embedding), {k: cpu_copy(v) for k, v in inputs.items()}
        if refiner_image is not None:
            refiner_image = refiner_image.to("cpu")
        nbytes = tensor_bytes(embedding, inputs, refiner_image) + 256
        self._lru.put(self._key(crop), (embedding, original_size, input_size, inputs, refiner_image), nbytes)


def cpu_copy(value: Any) -> Any:
    """A tensor (or a list of tensors) as float32 CPU copies, for the caches."""
    if isinstance(value, list):
        return [cpu_copy(v) for v in value]
    return value.detach().to("cpu", torch.float32).clone()


def tensor_bytes(*values: Any) -> int:
    """Bytes held by tensors (or anything with ``nbytes``, as a ``RefinerImage``), lists of them and dicts of
    either; None holds none."""
    total = 0
    for v in values:
        if isinstance(v, dict):
            total += tensor_bytes(*v.values())
        elif isinstance(v, list):
            total += tensor_bytes(*v)
        elif v is not None:
            total += v.nbytes
    return total
