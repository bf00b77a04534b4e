"""Training images drawn from label-map folders at random, each folder by its weight (the trainers that click
through a frozen model's answers: the refiners', the correction decoder's)."""

from __future__ import annotations

import random

import numpy as np

from segany.errors import SegAnyError
from segany.evaluation.protocols import _select_objects, load_samples


def check_train_data(train_data: list[dict]) -> None:
    """A config's ``train_data``: at least one ``{root, split, weight}`` (split and weight optional)."""
    if not train_data:
        raise SegAnyError("train_data: give at least one label-map folder ({root, split, weight})")
    for d in train_data:
        if not isinstance(d, dict) or "root" not in d or set(d) - {"root", "split", "weight"}:
            raise SegAnyError(f"train_data entry {d!r}: expected {{root, split, weight}}")


class ImageDraws:
    """Images of ``train_data``'s folders (:func:`check_train_data`) drawn with Python's ``random``: a folder by
    its weight, then one of its images; images without an object of ``min_area`` pixels are drawn again."""

    def __init__(self, train_data: list[dict], min_area: int) -> None:
        self.folders = [load_samples(d["root"], d.get("split")) for d in train_data]
        self.weights = [float(d.get("weight", 1.0)) for d in train_data]
        self.min_area = min_area

    def draw(self) -> tuple[object, list[tuple[int, np.ndarray, np.ndarray, int]]]:
        """A sample and its objects (``[(index, gt H x W, ignore H x W, visible area)]``, at least one)."""
        while True:
            folder = random.choices(self.folders, weights=self.weights)[0]
            sample = folder.folder.load(random.choice(folder.stems))
            objects, _ = _select_objects(sample, self.min_area, None)
            if objects:
                return sample, objects
