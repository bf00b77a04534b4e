"""Training data: datasets from config specs, the collate that packs a batch's masks, and the endless
per-rank sampler / epoch-indexed view behind the one long-lived DataLoader of a run."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segany.errors import SegAnyError
from segany.training.config import TrainConfig
from segany.training.distributed import DistInfo
from segany.training.embeddings_cache import CachedEmbeddingDataset, build_embedding_cache


def build_dataset(
    spec: dict[str, Any],
    *,
    image_size: int,
    max_masks: int,
    augment: Any = None,
    min_area: int = 16,
    max_coverage: float = 0.9,
    seed: int = 0,
) -> Dataset:
    """One dataset from a spec dict (see :mod:`segany.training.config`); ``weight`` is ignored here."""
    from segany.training import data as D
    from segany.training.synthetic import SyntheticScenes

    spec = dict(spec)
    kind = spec.pop("type", None)
    spec.pop("weight", None)
    common = dict(
        image_size=image_size, max_masks=max_masks, augment=augment, min_area=min_area, max_coverage=max_coverage
    )

    def need(key: str) -> Any:
        if key not in spec:
            raise SegAnyError(f"dataset spec {kind!r} needs {key!r}")
        return spec.pop(key)

    if kind == "synthetic":
        n_shapes = tuple(spec.pop("n_shapes", (3, 12)))
        ds: Dataset = SyntheticScenes(
            int(spec.pop("n", 64)), seed=int(spec.pop("seed", seed)), n_shapes=n_shapes, **common
        )  # type: ignore[arg-type]
    elif kind == "labelmap":
        root = need("root")
        ds = D.LabelMapDataset(root, spec.pop("split", None), seed=seed, **common)
    elif kind == "sa1b":
        ds = D.SA1BDataset(need("root"), seed=seed, **common)
    elif kind == "coco":
        if "root" in spec:
            ds = D.CocoInstancesDataset.from_folder(spec.pop("root"), spec.pop("split", None), seed=seed, **common)
        else:
            ds = D.CocoInstancesDataset(need("annotations"), need("images"), seed=seed, **common)
    else:
        raise SegAnyError(f"unknown dataset type {kind!r}")
    if spec:
        raise SegAnyError(f"dataset spec {kind!r}: unknown keys {', '.join(sorted(spec))}")
    return ds


class InterleavedDataset(Dataset):
    """Every item of several datasets once, round-robin (``a0 b0 a1 b1 ... a5 a6``): validation sets,
    so that the first ``k`` items already cover every part."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.datasets = list(datasets)
        self.order: list[tuple[int, int]] = []
        sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        for i in range(max(sizes, default=0)):
            self.order += [(d, i) for d, n in enumerate(sizes) if i < n]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d, i = self.order[index]
        return self.datasets[d][i]


def build_datasets(
    specs: Sequence[dict[str, Any]],
    cfg: TrainConfig,
    image_size: int,
    augment: Any,
    seed: int,
    mix: bool = True,
) -> Dataset:
    """The dataset of a spec list: with several, a weighted :class:`~segany.training.data.MixedDataset`
    (``mix``, training) or an :class:`InterleavedDataset` of all their items (validation)."""
    from segany.training.data import MixedDataset

    parts = [
        build_dataset(
            s,
            image_size=image_size,
            max_masks=cfg.max_masks,
            augment=augment,
            min_area=cfg.min_mask_area,
            max_coverage=cfg.max_mask_coverage,
            seed=seed,
        )
        for s in specs
    ]
    if len(parts) == 1:
        return parts[0]
    if not mix:
        return InterleavedDataset(parts)
    return MixedDataset(parts, [float(s.get("weight", 1.0)) for s in specs], seed=seed)


def augment_config(value: Any):
    """``TrainConfig.augment`` -> an ``AugmentConfig`` or None."""
    from segany.training.augment import AugmentConfig

    if value is True:
        return AugmentConfig()
    if value is False or value is None:
        return None
    try:
        return AugmentConfig(**value)
    except TypeError as e:
        raise SegAnyError(f"training option augment: {e}") from None


def collate_for_training(items: list[dict[str, Any]], pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack a batch and pack its valid masks (runs in the DataLoader workers, so no device sync later).

    Returns ``image`` ``B x 3 x S x S`` uint8 (or ``embedding`` ``B x C x h x w``), ``ignore``
    ``B x S x S``, ``valid_hw`` ``B x 2``, and per mask: ``gt_masks`` ``N x S x S`` bool, ``mask_image``
    ``N`` (its image's index) and ``mask_weight`` ``N`` (1 for real masks). ``N`` is padded with empty
    masks of weight 0 up to a multiple of ``pad_to_multiple`` (and to at least 1, so a batch without
    masks still runs the same graph on every process): on a GPU a handful of decoder batch sizes means
    kernels, attention plans and allocator blocks are reused instead of rebuilt for every new ``N``.
    """
    if not items:
        raise ValueError("empty batch")
    out: dict[str, torch.Tensor] = {}
    if "embedding" in items[0]:
        out["embedding"] = torch.stack([it["embedding"] for it in items])
    else:
        out["image"] = torch.stack([it["image"] for it in items])
    out["ignore"] = torch.stack([it["ignore"] for it in items])
    out["valid_hw"] = torch.stack([it["valid_hw"] for it in items]).long()
    masks = torch.stack([it["masks"] for it in items])  # B x M x S x S
    valid = torch.stack([it["mask_valid"] for it in items])  # B x M
    b, m = valid.shape
    idx = valid.reshape(-1).nonzero()[:, 0]
    n = len(idx)
    k = max(int(pad_to_multiple), 1)
    total = max(1, -(-n // k) * k)
    gt = masks.new_zeros((total, *masks.shape[-2:]))
    if n:
        gt[:n] = masks.reshape(b * m, *masks.shape[-2:]).index_select(0, idx)
    image_of = torch.zeros(total, dtype=torch.long)
    image_of[:n] = torch.div(idx, m, rounding_mode="floor")
    weight = torch.zeros(total)
    weight[:n] = 1.0
    out["gt_masks"], out["mask_image"], out["mask_weight"] = gt, image_of, weight
    return out


class EpochIndexedDataset(Dataset):
    """``base`` seen through "virtual" indices ``epoch * len(base) + i``: item ``i`` of that epoch.

    Lets one long-lived DataLoader iterator (persistent workers) run across epochs while datasets that
    seed their augmentation by ``(seed, epoch, index)`` still get the right epoch in every worker.
    """

    def __init__(self, base: Dataset):
        self.base = base
        self.n = len(base)  # type: ignore[arg-type]
        self._epoch = -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, vi: int) -> dict[str, Any]:
        epoch, i = divmod(int(vi), self.n)
        if epoch != self._epoch and hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        self._epoch = epoch
        return self.base[i]


class InfiniteDistributedSampler(Sampler[int]):
    """Endless shuffled virtual indices (see :class:`EpochIndexedDataset`) for one rank.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``, padded to a multiple of ``num_replicas`` and
    dealt round-robin, like ``DistributedSampler``. ``start`` skips that many of this rank's indices
    (resume at ``step * batch_size`` without loading the skipped items).
    """

    def __init__(
        self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True, start: int = 0
    ):
        if n < 1:
            raise SegAnyError("the training dataset is empty")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.per_rank = math.ceil(n / num_replicas)

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / self.n))[:total]
        return [epoch * self.n + i for i in order[self.rank :: self.num_replicas]]

    def __iter__(self) -> Iterator[int]:
        epoch, skip = divmod(self.start, self.per_rank)
        while True:
            yield from self._epoch_indices(epoch)[skip:]
            skip = 0
            epoch += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


def dataset_samples(dataset: Dataset, max_images: int | None = None) -> list[Any]:
    """Evaluation samples (:class:`segany.io.labelmaps.Sample`) from un-augmented training items.

    The item's content (top-left ``valid_hw`` of the padded square) becomes the image, so the predictor
    sees exactly what the trainer does.
    """
    from segany.io.labelmaps import Sample

    out = []
    n = len(dataset)  # type: ignore[arg-type]
    for i in range(n if max_images is None else min(n, max_images)):
        it = dataset[i]
        vh, vw = (int(v) for v in it["valid_hw"])
        valid = it["mask_valid"].numpy()
        image = np.ascontiguousarray(it["image"][:, :vh, :vw].permute(1, 2, 0).numpy())
        masks = it["masks"].numpy()[valid][:, :vh, :vw]
        names = [nm for nm, ok in zip(it.get("names", [None] * len(valid)), valid) if ok]
        out.append(Sample(image, masks, it["ignore"].numpy()[:vh, :vw], names, str(it.get("source", i))))
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def training_dataset(
    cfg: TrainConfig,
    model: torch.nn.Module,
    out_dir: Path,
    device: torch.device,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> Dataset:
    """``cfg.train_data`` at the model's input size: augmented images, or (frozen encoder with
    ``cache_embeddings``) un-augmented items whose embeddings are computed once into the cache."""
    cached = cfg.freeze_image_encoder and cfg.cache_embeddings
    augment = None if cached else augment_config(cfg.augment)
    train_ds = build_datasets(cfg.train_data, cfg, int(model.image_size), augment, cfg.seed)
    if not cached:
        return train_ds
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "embeddings"
    desc = json.dumps(
        {
            "data": cfg.train_data,
            "max_masks": cfg.max_masks,
            "min_area": cfg.min_mask_area,
            "max_coverage": cfg.max_mask_coverage,
        },
        sort_keys=True,
        default=str,
    )
    fp = build_embedding_cache(
        model,
        train_ds,
        cache_dir,
        desc,
        device=device,
        batch_size=max(1, cfg.batch_size),
        num_workers=cfg.num_workers,
        dtype=cfg.cache_dtype,
        autocast_dtype=autocast_dtype,
        rank=info.rank,
        world_size=info.world_size,
        barrier=info.barrier,
        progress=cfg.progress and info.is_main,
    )
    return CachedEmbeddingDataset(train_ds, cache_dir, fp)


def train_loader(
    dataset: Dataset, cfg: TrainConfig, info: DistInfo, device: torch.device, start_step: int
) -> DataLoader:
    """This rank's endless loader, positioned at ``start_step`` (a resumed run skips what it has seen)."""
    sampler = InfiniteDistributedSampler(
        len(dataset), info.world_size, info.rank, cfg.seed, shuffle=True, start=start_step * cfg.batch_size
    )
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    mask_multiple = cfg.mask_batch_multiple or (16 if device.type == "cuda" else 1)
    return DataLoader(
        EpochIndexedDataset(dataset),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate_for_training, pad_to_multiple=mask_multiple),
        pin_memory=pin,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )
