"""The SAM training loop (paper, section 3 and appendix A), single process or DDP.

One optimizer step on a batch of images:

1. every image is encoded once (or its embedding is read from the cache, see
   :mod:`segany.training.embeddings_cache`);
2. all valid masks of all images form one decoder batch (each mask gathers its image's embedding);
3. prompts are simulated for ``num_iterations`` decoder iterations (:mod:`segany.training.prompts`):
   a point or noisy box, then points from the error region with the previous low-res logits fed back
   as the mask prompt, plus mask-only iterations; the first iteration is multimask (for a box prompt its
   3 slots all hold the single-output mask) and trains only its
   best output;
4. loss = ``20 focal + 1 dice + 1 IoU-MSE`` (:mod:`segany.training.losses`) averaged over masks and
   iterations; AdamW with warm-up + step decay (:mod:`segany.training.optim`).

Runs write to ``out_dir``: ``last.pt`` (resumable, tensors-only, atomic), ``metrics.jsonl``,
``training.png``, ``best.safetensors`` (best validation metric), ``final.safetensors``,
``summary.json`` and ``config.yaml``. DDP: ``torchrun --nproc_per_node=N -m segany.training.trainer
--config FILE.yaml`` (gloo on CPU, nccl on GPU); rank 0 logs, validates and writes.

Host synchronisation: a step makes none on its own (prompt randomness that decides shapes is drawn
on the host, everything else on the device); the metrics are read back every ``log_every`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stray_temp_files
from segany.training.config import TrainConfig
from segany.training.embeddings_cache import (
    CachedEmbeddingDataset,
    build_embedding_cache,
    encoder_input,
)
from segany.training.losses import LossConfig, downsample_targets, sam_mask_loss
from segany.training.optim import build_optimizer, build_scheduler
from segany.training.prompts import (
    POINT,
    PromptSet,
    error_region_points,
    initial_prompts,
    iteration_schedule,
    upsample_logits,
)

CHECKPOINT_VERSION = 1
#: What a run writes directly in ``out_dir`` (the embeddings cache keeps its own folder).
RUN_FILES = ("last.pt", "metrics.jsonl", "training.png", "best.safetensors", "final.safetensors", "summary.json",
             "config.yaml")
LOG_KEYS = ("loss", "focal", "dice", "iou_mse", "iou_first", "iou_last")

# =====================================================================================================
# data


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


# =====================================================================================================
# one training step as a module (so DDP sees a single forward and backward)


@dataclass
class StepOptions:
    num_iterations: int = 11
    num_mask_only_iterations: int | None = None
    box_prob: float = 0.5
    box_noise_std: float = 0.1
    box_noise_max: float = 20.0
    loss_resolution: str = "low_res"
    loss: LossConfig = field(default_factory=LossConfig)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast for encoder + decoder, None = fp32
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig, autocast_dtype: torch.dtype | None) -> StepOptions:
        return cls(
            num_iterations=cfg.num_iterations,
            num_mask_only_iterations=cfg.num_mask_only_iterations,
            box_prob=cfg.box_prob,
            box_noise_std=cfg.box_noise_std,
            box_noise_max=cfg.box_noise_max,
            loss_resolution=cfg.loss_resolution,
            loss=LossConfig(
                cfg.focal_weight, cfg.dice_weight, cfg.iou_weight, cfg.focal_alpha, cfg.focal_gamma, cfg.iou_loss_on
            ),
            autocast_dtype=autocast_dtype,
            channels_last=cfg.channels_last,
        )


def content_masks(valid_hw: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """``B x S x S`` bool: True inside each image's content (top-left ``valid_hw``)."""
    r = torch.arange(size, device=device)
    vh = valid_hw[:, 0].to(device)
    vw = valid_hw[:, 1].to(device)
    return (r[None, :, None] < vh[:, None, None]) & (r[None, None, :] < vw[:, None, None])


class SamTrainStep(nn.Module):
    """``forward(batch) -> {"loss", "focal", "dice", "iou_mse", "iou_first", "iou_last"}`` (scalars).

    ``batch`` is :func:`collate_for_training`'s output on the device. Randomness comes from torch's
    default generators (the trainer reseeds them per step from ``(seed, rank, step)``); the host-side
    draws (which masks start from a box, the iteration schedule) use the CPU generator, so a step needs
    no device -> host copy.
    """

    def __init__(self, model: nn.Module, options: StepOptions, freeze_image_encoder: bool = False):
        super().__init__()
        self.model = model
        self.opt = options
        self.freeze_image_encoder = freeze_image_encoder
        self._touch = [p for p in model.prompt_encoder.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> SamTrainStep:
        super().train(mode)
        if self.freeze_image_encoder:
            self.model.image_encoder.eval()  # frozen: no BN statistics updates, no drop path
        return self

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.opt.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.opt.autocast_dtype)

    def embed_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "embedding" in batch:
            return batch["embedding"].float()
        model = self.model
        x = encoder_input(model, batch["image"], batch["valid_hw"])
        if self.opt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.is_grad_enabled() and not self.freeze_image_encoder
        with torch.set_grad_enabled(grad), self._autocast(x.device):
            emb = model.image_encoder(x)
        return emb.float()

    def _encode_prompts(self, prompts: PromptSet, mask_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.model.prompt_encoder
        sparse, dense = [], []
        # fp32: the Fourier features of coordinates lose their precision in bf16
        with torch.autocast(device_type=prompts.points.device.type, enabled=False):
            for rows, pts, boxes in prompts.encoder_args():
                s, d = pe(points=pts, boxes=boxes, masks=mask_input[rows] if mask_input is not None else None)
                sparse.append(s)
                dense.append(d)
        if len(sparse) == 1:
            return sparse[0], dense[0]
        return torch.cat(sparse), torch.cat(dense)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        opt = self.opt
        model = self.model
        gt_all = batch["gt_masks"]
        dev = gt_all.device
        n = gt_all.shape[0]
        size = gt_all.shape[-1]

        # host-side draws: which masks start from a box, and the iteration schedule
        perm = torch.randperm(n)
        num_box = int((torch.rand(n) < opt.box_prob).sum())
        schedule = iteration_schedule(opt.num_iterations, opt.num_mask_only_iterations)
        perm_d = perm.to(dev, non_blocking=True)
        gt = gt_all.index_select(0, perm_d)
        img_idx = batch["mask_image"].index_select(0, perm_d)
        weight = batch["mask_weight"].index_select(0, perm_d).float()

        emb = self.embed_images(batch)  # B x C x h x w
        content = content_masks(batch["valid_hw"], size, dev)
        valid = (content & ~batch["ignore"]).index_select(0, img_idx)  # N x S x S
        content_hw = batch["valid_hw"].to(dev).index_select(0, img_idx)
        emb_m = emb.index_select(0, img_idx)
        image_pe = model.prompt_encoder.get_dense_pe()
        low_hw = (4 * emb.shape[-2], 4 * emb.shape[-1])
        if opt.loss_resolution == "low_res":
            gt_l, valid_l = downsample_targets(gt, valid, low_hw)
        else:
            gt_l, valid_l = gt, valid

        prompts = initial_prompts(gt, valid, content_hw, num_box, opt.box_noise_std, opt.box_noise_max)
        mask_input: torch.Tensor | None = None
        pred_full: torch.Tensor | None = None
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "focal", "dice", "iou_mse")}
        ious = []
        for k, kind in enumerate(schedule):
            if kind == POINT:
                assert pred_full is not None
                coords, labels = error_region_points(pred_full, gt, valid)
                prompts = prompts.add_points(coords, labels)
            sparse, dense = self._encode_prompts(prompts, mask_input)
            with self._autocast(dev):
                if k == 0:
                    # A lone point is ambiguous: 3 masks, loss on the best. A box is not: it trains the
                    # single-output token, which is what predict(box=..., multimask_output=False) uses.
                    low_res, iou_pred = model.mask_decoder.predict_masks(emb_m, image_pe, sparse, dense)
                    single, multi = low_res[:, :1], low_res[:, 1:]
                    is_box = (torch.arange(n, device=dev) < prompts.num_box)[:, None]
                    low_res = torch.where(is_box[:, :, None, None], single.expand_as(multi), multi)
                    iou_pred = torch.where(is_box, iou_pred[:, :1].expand_as(iou_pred[:, 1:]), iou_pred[:, 1:])
                else:
                    low_res, iou_pred = model.mask_decoder(emb_m, image_pe, sparse, dense, multimask_output=False)
            logits = (
                low_res
                if opt.loss_resolution == "low_res"
                else upsample_logits(low_res.flatten(0, 1), size).view(*low_res.shape[:2], size, size)
            )
            out = sam_mask_loss(logits, iou_pred, gt_l, valid_l, opt.loss)
            for key in sums:
                sums[key] = sums[key] + (out[key] * weight).sum()
            ious.append(out["iou"])
            chosen = low_res.gather(1, out["best"][:, None, None, None].expand(-1, 1, *low_res.shape[-2:]))
            mask_input = chosen.detach().float()  # N x 1 x h x w, fed back as the mask prompt
            if k + 1 < len(schedule) and schedule[k + 1] == POINT:
                with torch.no_grad():
                    pred_full = upsample_logits(mask_input[:, 0], size) > 0
        denom = weight.sum().clamp(min=1.0) * len(schedule)
        res = {key: v / denom for key, v in sums.items()}
        # every prompt-encoder parameter takes part in every step (DDP needs that; no-op numerically)
        if self._touch:
            res["loss"] = res["loss"] + 0.0 * sum(p.reshape(-1)[0] for p in self._touch)
        wsum = weight.sum().clamp(min=1.0)
        res["iou_first"] = (ious[0] * weight).sum() / wsum
        res["iou_last"] = (ious[-1] * weight).sum() / wsum
        return res


# =====================================================================================================
# helpers: distributed, devices, seeds, model


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SegAnyError(f"device {device_pref!r}: CUDA is not available")
            if device.index is None:
                device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return info, device


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1)


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model to train: from a checkpoint, a named config or a config dict; drop path applied."""
    from segany.checkpoint import load_model
    from segany.modeling import SamConfig, build_sam, get_config

    if cfg.checkpoint:
        model = load_model(cfg.checkpoint)
    else:
        sam_cfg = get_config(cfg.model) if isinstance(cfg.model, str) else SamConfig.from_dict(cfg.model)
        model = build_sam(sam_cfg)
    if cfg.drop_path_rate is not None and model.config is not None:
        if model.config.encoder.drop_path_rate != cfg.drop_path_rate:
            new_cfg = dataclasses.replace(
                model.config, encoder=dataclasses.replace(model.config.encoder, drop_path_rate=cfg.drop_path_rate)
            )
            rebuilt = build_sam(new_cfg)
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt
    return model


def apply_freezing(model: nn.Module, cfg: TrainConfig) -> None:
    for part, frozen in (
        (model.image_encoder, cfg.freeze_image_encoder),
        (model.prompt_encoder, cfg.freeze_prompt_encoder),
        (model.mask_decoder, cfg.freeze_mask_decoder),
    ):
        for p in part.parameters():
            p.requires_grad_(not frozen)


def weights_sha256(model: nn.Module) -> str:
    """Hash of a model's state dict (names, dtypes, shapes, bytes) - equal weights, equal hash."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # reshape(-1): a tensor with size-1 dims can be "contiguous" with a last stride != 1
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# =====================================================================================================
# checkpoints, logs, plots


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of a tensors-and-numbers dict, written atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SegAnyError(f"{path}: cannot resume from this file ({str(e).splitlines()[0] if str(e) else e})") from None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (kind "train" or "val").

    Lines are appended (a log is the one file not rewritten atomically: a crash can at worst leave a
    torn last line, which :meth:`read` skips); on resume lines after the resumed step are dropped
    with an atomic rewrite.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def truncate_after(self, step: int) -> None:
        recs = [r for r in self.read() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in recs))

    def append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def plot_metrics(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """``training.png``: training loss (left) and validation mIoU / loss (right). False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if train:
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r["loss"] for r in train], label="loss")
        ax1.plot(steps, [r["focal"] * 20 for r in train], label="20 x focal", alpha=0.6)
        ax1.plot(steps, [r["dice"] for r in train], label="dice", alpha=0.6)
        ax1.plot(steps, [r["iou_mse"] for r in train], label="IoU MSE", alpha=0.6)
        ax1.set_yscale("log")
    ax1.set(xlabel="step", title="training loss")
    if train:
        ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if val:
        steps = [r["step"] for r in val]
        for key, label in (
            ("val_click_miou1", "click mIoU@1"),
            ("val_box_miou", "box mIoU"),
            ("val_iou_last", "mIoU after all iterations (val batches)"),
        ):
            ys = [r.get(key) for r in val]
            if any(y is not None for y in ys):
                ax2.plot(steps, [np.nan if y is None else y for y in ys], marker="o", markersize=3, label=label)
        ax2.set_ylim(0, 1)
        if any(r.get("val_loss") is not None for r in val):
            ax3 = ax2.twinx()
            ax3.plot(
                steps,
                [np.nan if r.get("val_loss") is None else r["val_loss"] for r in val],
                color="gray",
                linestyle="--",
                label="val loss",
            )
            ax3.set_ylabel("val loss")
    ax2.set(xlabel="step", title="validation")
    if val:
        ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


# =====================================================================================================
# validation


@torch.no_grad()
def validation_loss(
    step_module: SamTrainStep,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    max_images: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean step loss (and IoUs) over the first ``max_images`` items, fixed prompts (``seed``)."""
    n = min(len(dataset), max_images)  # type: ignore[arg-type]
    if n == 0:
        return {}
    was = step_module.training
    step_module.eval()
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            out = step_module(_to_device(collate_for_training(items), device))
            k = len(items)
            for key, v in out.items():
                sums[key] = sums.get(key, 0.0) + float(v) * k
            count += k
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        step_module.train(was)
    return {f"val_{k}": v / count for k, v in sums.items()}


@torch.no_grad()
def validate(
    step_module: SamTrainStep,
    val_dataset: Dataset,
    samples: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Validation loss plus click mIoU@1 and box mIoU (segany.evaluation protocols) on ``samples``."""
    from segany.evaluation.protocols import run_box, run_clicks
    from segany.predictor import SamPredictor

    t0 = time.perf_counter()
    res: dict[str, Any] = validation_loss(step_module, val_dataset, device, cfg.batch_size, cfg.val_max_images)
    model = step_module.model
    was = step_module.training
    model.eval()
    try:
        pred = SamPredictor(model)
        clicks = run_clicks(pred, samples, max_clicks=cfg.val_max_clicks, max_objects_per_image=cfg.val_max_objects)
        boxes = run_box(pred, samples, max_objects_per_image=cfg.val_max_objects)
    finally:
        step_module.train(was)
    cs, bs = clicks.summary(), boxes.summary()
    res["val_click_miou1"] = cs.get("mIoU@1")
    res["val_box_miou"] = bs.get("mIoU")
    res["val_objects"] = cs.get("num_objects")
    res["val_seconds"] = round(time.perf_counter() - t0, 3)
    ok = [v for v in (res["val_click_miou1"], res["val_box_miou"]) if v is not None and math.isfinite(v)]
    res["val_mean_miou"] = float(np.mean(ok)) if ok else None
    return res


def _metric_value(cfg: TrainConfig, val: dict[str, Any]) -> float | None:
    """Higher is better (val_loss is negated); None when not available."""
    key = {
        "mean_miou": "val_mean_miou",
        "click_miou1": "val_click_miou1",
        "box_miou": "val_box_miou",
        "val_loss": "val_loss",
    }[cfg.best_metric]
    v = val.get(key)
    if v is None or not math.isfinite(v):
        return None
    return -float(v) if cfg.best_metric == "val_loss" else float(v)


# =====================================================================================================
# the loop


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    model: nn.Module
    step: int
    out_dir: Path
    history: list[dict[str, Any]]
    best_metric: float | None
    summary: dict[str, Any]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for what is written."""
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> TrainResult:
    info, device = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stray_temp_files(out_dir, RUN_FILES)  # a killed run's half-written files, never valid
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    info.barrier()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    autocast_dtype = resolve_autocast(cfg.precision, device)

    model = build_model(cfg)
    apply_freezing(model, cfg)
    model.to(device)
    if cfg.channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    image_size = int(model.image_size)

    # -- data --
    cached = cfg.freeze_image_encoder and cfg.cache_embeddings
    aug = None if cached else augment_config(cfg.augment)
    train_ds = build_datasets(cfg.train_data, cfg, image_size, aug, cfg.seed)
    if cached:
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
        train_ds = CachedEmbeddingDataset(train_ds, cache_dir, fp)
    val_ds = build_datasets(cfg.val_data, cfg, image_size, None, cfg.seed + 1, mix=False) if cfg.val_data else None
    val_samples = dataset_samples(val_ds, cfg.val_max_images) if (val_ds is not None and info.is_main) else []

    # -- optimisation --
    step_module = SamTrainStep(model, StepOptions.from_config(cfg, autocast_dtype), cfg.freeze_image_encoder)
    step_module.train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.layer_decay)
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps, cfg.lr_decay_at, cfg.lr_decay_factor)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # -- resume --
    log = MetricsLog(out_dir / "metrics.jsonl")
    start_step = 0
    best: float | None = None
    best_step: int | None = None
    last_path = out_dir / "last.pt"
    if cfg.resume and last_path.is_file():
        state = load_training_state(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        best = state.get("best_metric")
        best_step = state.get("best_step")
        set_rng_state(state["rng"])
        if info.is_main:
            log.truncate_after(start_step)
            print(f"segany train: resuming from {last_path} at step {start_step} of {cfg.max_steps}", file=sys.stderr)
    elif info.is_main and log.path.exists():
        log.path.unlink()  # a fresh run starts a fresh log
    info.barrier()

    ddp_module: nn.Module = step_module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_module = DDP(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters,
        )

    sampler = InfiniteDistributedSampler(
        len(train_ds), info.world_size, info.rank, cfg.seed, shuffle=True, start=start_step * cfg.batch_size
    )
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    mask_multiple = cfg.mask_batch_multiple or (16 if device.type == "cuda" else 1)
    loader = DataLoader(
        EpochIndexedDataset(train_ds),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate_for_training, pad_to_multiple=mask_multiple),
        pin_memory=pin,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )

    def checkpoint(step: int) -> None:
        if not info.is_main:
            return
        save_training_state(
            last_path,
            {
                "version": CHECKPOINT_VERSION,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "best_metric": best,
                "best_step": best_step,
                "rng": rng_state(),
                "config": json.dumps(cfg.to_dict(), default=str),
            },
        )

    def run_validation(step: int) -> dict[str, Any] | None:
        nonlocal best, best_step
        rec = None
        if info.is_main and val_ds is not None:
            val = validate(step_module, val_ds, val_samples, cfg, device)
            rec = {"kind": "val", "step": step, **val}
            log.append(_jsonable(rec))
            value = _metric_value(cfg, val)
            if value is not None and (best is None or value > best):
                best, best_step = value, step
                from segany.checkpoint import save_model

                save_model(model, out_dir / "best.safetensors", half=cfg.export_half)
            plot_metrics(log.read(), out_dir / "training.png")
        info.barrier()
        return rec

    bar = None
    if cfg.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    if start_step == 0 and cfg.val_at_start and val_ds is not None:
        run_validation(0)

    acc: dict[str, torch.Tensor] = {}
    acc_n = 0
    data_wait = 0.0  # host seconds spent waiting for the DataLoader since the last log
    t_log = time.perf_counter()
    step = start_step
    data_iter = iter(loader)
    global_batch = cfg.batch_size * info.world_size
    last_train: dict[str, Any] | None = None
    try:
        while step < cfg.max_steps:
            t_wait = time.perf_counter()
            batch = _to_device(next(data_iter), device)
            data_wait += time.perf_counter() - t_wait
            torch.manual_seed(step_seed(cfg.seed, info.rank, step))
            out = ddp_module(batch)
            lr_now = max(g["lr"] for g in optimizer.param_groups)  # the lr this step uses
            out["loss"].backward()
            if cfg.grad_clip > 0:
                out["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k, v in out.items():
                acc[k] = acc[k] + v.detach().float() if k in acc else v.detach().float()
            acc_n += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                keys = sorted(acc)
                vals = torch.stack([acc[k] for k in keys]).cpu().tolist()  # the one sync per log interval
                now = time.perf_counter()
                rec = {"kind": "train", "step": step, **{k: v / acc_n for k, v in zip(keys, vals)}}
                if not math.isfinite(rec["loss"]):
                    raise SegAnyError(f"training diverged: the loss is {rec['loss']} at step {step}")
                rec["lr"] = lr_now
                rec["steps_per_s"] = acc_n / max(now - t_log, 1e-9)
                rec["images_per_s"] = rec["steps_per_s"] * global_batch
                rec["data_wait_frac"] = data_wait / max(now - t_log, 1e-9)  # ~1: the loader is the bottleneck
                if device.type == "cuda":
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                last_train = rec
                if info.is_main:
                    log.append(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", iou=f"{rec['iou_last']:.3f}")
                acc, acc_n, data_wait, t_log = {}, 0, 0.0, time.perf_counter()
            do_val = val_ds is not None and cfg.val_every > 0 and step % cfg.val_every == 0
            if do_val and step < cfg.max_steps:
                run_validation(step)
                data_wait, t_log = 0.0, time.perf_counter()
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
        del data_iter

    # -- the end: validate, checkpoint, export --
    final_val = run_validation(step) if val_ds is not None else None
    checkpoint(step)
    hashes = [weights_sha256(model)]
    if info.distributed:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, hashes[0])
        hashes = [str(h) for h in gathered]
    summary: dict[str, Any] = {}
    if info.is_main:
        from segany.checkpoint import save_model

        save_model(model, out_dir / "final.safetensors", half=cfg.export_half)
        if best is None and val_ds is None:
            # no validation: the final weights are the best we know
            save_model(model, out_dir / "best.safetensors", half=cfg.export_half)
        summary = {
            "steps": step,
            "world_size": info.world_size,
            "device": str(device),
            "precision": "bf16" if autocast_dtype is not None else "fp32",
            "best_metric": cfg.best_metric,
            "best_value": best if cfg.best_metric != "val_loss" or best is None else -best,
            "best_step": best_step,
            "last_train": last_train,
            "final_val": final_val,
            "weights_sha256_by_rank": hashes,
        }
        atomic_write_json(out_dir / "summary.json", _jsonable(summary), indent=2)
        plot_metrics(log.read(), out_dir / "training.png")
    info.barrier()
    history = log.read() if info.is_main else []
    return TrainResult(model, step, out_dir, history, best, summary)


# =====================================================================================================
# command line


def _parse_value(text: str) -> Any:
    """A flag value as YAML (``true``, ``[0.5, 0.9]``, ``{type: synthetic}``); ``1e-3`` is a number."""
    import yaml

    try:
        return float(text) if "e" in text.lower() and float(text) == float(text) else yaml.safe_load(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


TRAIN_DESCRIPTION = (
    "Train or fine-tune a SAM model (paper recipe). Options come from --config FILE.yaml; "
    "every option can also be given as a flag, which wins over the file. Values are YAML "
    "(e.g. --freeze-image-encoder true, --lr-decay-at '[0.6, 0.9]')."
)


def build_arg_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``segany train``, added to ``p`` (a new parser when None)."""
    if p is None:
        p = argparse.ArgumentParser(prog="segany train", description=TRAIN_DESCRIPTION)
    p.add_argument("--config", help="YAML file of training options")
    p.add_argument("--print-config", action="store_true", help="print the resolved options and exit")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar="VALUE",
            type=_parse_value,
            help=argparse.SUPPRESS,
        )
    return p


def config_from_args(argv: Sequence[str] | argparse.Namespace | None) -> tuple[TrainConfig, bool]:
    """Resolve the options of a command line (or of an already parsed namespace)."""
    args = argv if isinstance(argv, argparse.Namespace) else build_arg_parser().parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, overrides)
    else:
        cfg = TrainConfig.from_dict(overrides)
    return cfg, bool(args.print_config)


def train_main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """``segany train``: parse ``argv`` (see :func:`build_arg_parser`), train, return 0.

    Raises :class:`SegAnyError` for bad options / data (the CLI prints it as one line).
    """
    cfg, print_only = config_from_args(argv)
    if print_only:
        sys.stdout.write(cfg.to_yaml())
        return 0
    try:
        res = train(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if res.summary:
        print(
            json.dumps(_jsonable({k: res.summary.get(k) for k in ("steps", "best_metric", "best_value", "best_step")}))
        )
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m segany.training.trainer --config FILE.yaml
    try:
        sys.exit(train_main(sys.argv[1:]))
    except SegAnyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
