"""Images with text queries and their target masks, for training and measuring the text head.

A *text sample* is one image, its queries and one target mask per query: the union of everything the
query names. Queries are either a category name (real data: "person", "sky-other-merged", "shoes") or an
attribute query of the synthetic scenes (``{"color": "red", "shape": "circle"}``); phrases are made from
them at training time (:mod:`segany.text.phrases`), so every epoch sees other wordings.

Sources:

* :class:`CategoryTargets`: a label-map folder with names in ``meta/`` (COCO instances, clothing parts);
  for a COCO panoptic folder (``masks_panoptic/``) every segment, things and stuff (crowd regions
  included: they are that category too).
* :class:`SyntheticTargets`: procedural scenes of :mod:`segany.training.synthetic`.

:class:`TextItemDataset` turns a source into fixed-size items (``image``, ``valid_hw`` as the training
datasets, so the embedding cache reads them) plus the queries' targets at the decoder's low resolution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segany.errors import SegAnyError
from segany.io.labelmaps import VOID_ID, LabelMapFolder, read_label_map
from segany.text.phrases import attribute_queries
from segany.training.data import ItemConfig, to_training_item
from segany.training.losses import downsample_targets
from segany.training.synthetic import SyntheticScenes

Query = str | dict


@dataclass
class TextSample:
    image: np.ndarray  #: H x W x 3 uint8
    targets: np.ndarray  #: K x H x W bool, one per query
    queries: list[Query]  #: K
    ignore: np.ndarray  #: H x W bool


class CategoryTargets:
    """One target per category name present in each image of a label-map folder (+ split)."""

    def __init__(self, root: str | os.PathLike, split: str | None = None) -> None:
        self.folder = LabelMapFolder(root, split, crowd_as_ignore=False)
        self.panoptic = (self.folder.root / "masks_panoptic").is_dir()
        self.name = f"{self.folder.root.name}:{split}"

    def __len__(self) -> int:
        return len(self.folder)

    def _panoptic(self, stem: str) -> tuple[np.ndarray, dict[int, str]]:
        lm = read_label_map(self.folder.root / "masks_panoptic" / f"{stem}.png")
        meta_path = self.folder.root / "meta" / f"{stem}.json"
        try:
            segments = json.loads(meta_path.read_text(encoding="utf-8"))["segments"]
            names = {int(s["panoptic_label"]): str(s["category"]) for s in segments}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SegAnyError(f"{meta_path}: cannot read the panoptic segments ({e})") from None
        return lm, names

    def sample(self, index: int) -> TextSample:
        stem = self.folder.stems[index]
        image = self.folder.load_image(stem)
        if self.panoptic:
            lm, names = self._panoptic(stem)
        else:
            lm = self.folder.load_label_map(stem)
            names, _crowd = self.folder.load_meta(stem)
        if lm.shape != image.shape[:2]:
            raise SegAnyError(f"{self.folder.root}/{stem}: mask {lm.shape} vs image {image.shape[:2]}")
        by_name: dict[str, list[int]] = {}
        for i in np.unique(lm):
            name = names.get(int(i))
            if int(i) not in (0, VOID_ID) and name and name != "null":
                by_name.setdefault(name, []).append(int(i))
        queries = sorted(by_name)
        targets = (
            np.stack([np.isin(lm, by_name[q]) for q in queries]) if queries else np.zeros((0, *lm.shape), bool)
        )
        return TextSample(image, targets, list(queries), lm == VOID_ID)


class SyntheticTargets:
    """Procedural scenes (``SyntheticScenes``' canvases) with every attribute query they support."""

    def __init__(self, n: int, image_size: int, seed: int = 0, n_shapes: tuple[int, int] = (3, 8)) -> None:
        self.scenes = SyntheticScenes(n, image_size=image_size, seed=seed, n_shapes=n_shapes)
        self.name = f"synthetic:{n}:{seed}:{n_shapes}"

    def __len__(self) -> int:
        return len(self.scenes)

    def sample(self, index: int) -> TextSample:
        sc, rng = self.scenes.scene(index)
        qs = attribute_queries(sc["attributes"])
        order = rng.permutation(len(qs))  # which queries survive a cap is then not biased to the back shapes
        qs = [qs[i] for i in order]
        masks = sc["masks"]
        targets = np.stack([masks[m].any(axis=0) for _, m in qs]) if qs else np.zeros((0, *masks.shape[1:]), bool)
        return TextSample(sc["image"], targets, [q for q, _ in qs], sc["ignore"])


class TextItemDataset(Dataset):
    """Items of a text source at the model's input size.

    Each item: ``image`` (3 x S x S uint8), ``valid_hw``, ``targets`` (K x L x L bool at the decoder's
    low resolution L = S / 4), ``valid`` (L x L: content and not void), ``queries`` (K, list).
    """

    def __init__(self, source: CategoryTargets | SyntheticTargets, image_size: int, max_queries: int = 32) -> None:
        self.source = source
        self.cfg = ItemConfig(image_size=image_size, max_masks=max_queries, min_area=1, max_coverage=1.0)
        self.low = image_size // 4

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.source.sample(index)
        item = to_training_item(s.image, self.cfg, None, masks=s.targets, ignore=s.ignore)
        n = int(item["mask_valid"].sum())
        vh, vw = item["valid_hw"].tolist()
        content = torch.zeros(self.cfg.image_size, self.cfg.image_size, dtype=torch.bool)
        content[:vh, :vw] = True
        valid = content & ~item["ignore"]
        size = (self.low, self.low)
        v_low = downsample_targets(valid[None], valid[None], size)[1][0]
        gt = downsample_targets(item["masks"][:n], valid.expand(n, -1, -1), size)[0]
        return {
            "image": item["image"],
            "valid_hw": item["valid_hw"],
            "targets": gt,
            "valid": v_low,
            "queries": [s.queries[i] for i in item["mask_ids"][:n].tolist()],
        }


def build_source(spec: dict[str, Any], image_size: int) -> CategoryTargets | SyntheticTargets:
    """A source from a config spec: ``{type: labelmap, root, split}`` or ``{type: synthetic, n, seed}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "labelmap":
        root = spec.pop("root", None)
        if root is None or not Path(root).is_dir():
            raise SegAnyError(f"text data: no such folder {root!r}")
        out: CategoryTargets | SyntheticTargets = CategoryTargets(root, spec.pop("split", None))
    elif kind == "synthetic":
        n_shapes = tuple(spec.pop("n_shapes", (3, 8)))
        out = SyntheticTargets(int(spec.pop("n", 1000)), image_size, int(spec.pop("seed", 0)), n_shapes)
    else:
        raise SegAnyError(f"text data: unknown type {kind!r} (labelmap or synthetic)")
    if spec:
        raise SegAnyError(f"text data: unknown keys {sorted(spec)}")
    return out
