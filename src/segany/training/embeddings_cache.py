"""Frozen-encoder training: image embeddings computed once, stored on disk, read back every epoch.

With ``freeze_image_encoder`` and ``cache_embeddings`` the trainer embeds every *un-augmented* training
image once (the same pixels every epoch, so one embedding per image is exact) and then trains the prompt
encoder / mask decoder from the cache: a step costs only the decoder, which is fast even on a CPU.

Layout of the cache folder::

    manifest.json          {"fingerprint", "count", "shape", "dtype"} - written last
    00000000.safetensors   one tensor "embedding" (C x h x w), fingerprint in the metadata
    ...

The fingerprint hashes the encoder weights, the input size / pixel statistics and a description of the
dataset, so a cache made for other weights or other data is recomputed, never silently reused. Files
are written atomically (safetensors, no pickles), and existing files with the right fingerprint are kept,
so an interrupted computation resumes where it stopped. Under DDP each rank embeds its share.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes, atomic_write_json
from segany.training.distributed import autocast

MANIFEST = "manifest.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encoder_input(model: torch.nn.Module, images: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:
    """SAM's encoder input from zero-padded ``B x 3 x S x S`` pixel images (uint8 or float).

    Normalises with the model's pixel mean / std and zeroes everything outside the content
    (``valid_hw`` ``B x 2``), which is exactly ``Sam.preprocess`` (normalise, then zero-pad) of the
    unpadded image.
    """
    x = (images.float() - model.pixel_mean) / model.pixel_std
    s_h, s_w = x.shape[-2:]
    ys = torch.arange(s_h, device=x.device)
    xs = torch.arange(s_w, device=x.device)
    vh = valid_hw[:, 0].to(x.device)
    vw = valid_hw[:, 1].to(x.device)
    inside = (ys[None, :, None] < vh[:, None, None]) & (xs[None, None, :] < vw[:, None, None])
    return x * inside[:, None].to(x.dtype)


def encoder_fingerprint(model: torch.nn.Module, dataset_description: str) -> str:
    """SHA-256 over the encoder weights, the preprocessing constants and ``dataset_description``."""
    h = hashlib.sha256()
    h.update(dataset_description.encode())
    h.update(str(getattr(model, "image_size", "")).encode())
    for t in (model.pixel_mean, model.pixel_std):
        h.update(t.detach().float().cpu().numpy().tobytes())
    for name, t in sorted(model.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"{index:08d}.safetensors"


def _file_ok(path: Path, fingerprint: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # missing, truncated or foreign file: recompute it
        return False


class _Indexed(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[self.indices[i]]
        return {"index": self.indices[i], "image": item["image"], "valid_hw": item["valid_hw"]}


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "image": torch.stack([it["image"] for it in items]),
        "valid_hw": torch.stack([it["valid_hw"] for it in items]),
    }


@torch.no_grad()
def build_embedding_cache(
    model: torch.nn.Module,
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    dataset_description: str,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    dtype: str = "float16",
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = False,
) -> str:
    """Embed every image of ``dataset`` (un-augmented items) into ``cache_dir``; return the fingerprint.

    Each rank embeds indices ``rank::world_size`` that are not cached yet; ``barrier`` (if given) is
    called before rank 0 writes the manifest and again after it.
    """
    if dtype not in _DTYPES:
        raise SegAnyError(f"cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fp = encoder_fingerprint(model, dataset_description)
    n = len(dataset)
    manifest = cache / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            m = {}
        if m.get("fingerprint") == fp and m.get("count") == n:
            if barrier is not None:
                barrier()
            return fp
    todo = [i for i in range(rank, n, world_size) if not _file_ok(_file(cache, i), fp)]
    encoder = model.image_encoder
    was_training = encoder.training
    encoder.eval()
    shape: list[int] = []
    try:
        if todo:
            loader = DataLoader(
                _Indexed(dataset, todo),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_collate,
            )
            it = loader
            if progress:
                from tqdm import tqdm

                it = tqdm(loader, desc="embedding cache", unit="batch", dynamic_ncols=True)
            from safetensors.torch import save

            for batch in it:
                x = encoder_input(model, batch["image"].to(device), batch["valid_hw"])
                with autocast(device, autocast_dtype):
                    emb = model.embed_image(x)[0]  # the model's own embedding (its other decoder inputs unused)
                emb = emb.to(_DTYPES[dtype]).cpu()
                shape = list(emb.shape[1:])
                for j, idx in enumerate(batch["index"].tolist()):
                    data = save({"embedding": emb[j].contiguous()}, metadata={"fingerprint": fp})
                    atomic_write_bytes(_file(cache, idx), data)
    finally:
        encoder.train(was_training)
    if barrier is not None:
        barrier()
    if rank == 0:
        missing = [i for i in range(n) if not _file(cache, i).is_file()]
        if missing:
            raise SegAnyError(f"{cache}: embeddings missing for {len(missing)} images (e.g. #{missing[0]})")
        if not shape:
            from safetensors import safe_open

            with safe_open(str(_file(cache, 0)), framework="pt") as f:
                shape = list(f.get_slice("embedding").get_shape())
        atomic_write_json(manifest, {"fingerprint": fp, "count": n, "shape": shape, "dtype": dtype}, indent=2)
    if barrier is not None:
        barrier()
    return fp


class CachedEmbeddingDataset(Dataset):
    """Items of ``base`` (un-augmented) with ``embedding`` (``C x h x w``) from the cache, no ``image``.

    Raises :class:`SegAnyError` when the cache's manifest does not match ``fingerprint`` / the size.
    """

    def __init__(self, base: Dataset, cache_dir: str | os.PathLike, fingerprint: str | None = None):
        self.base = base
        self.cache_dir = Path(cache_dir)
        manifest = self.cache_dir / MANIFEST
        if not manifest.is_file():
            raise SegAnyError(f"{self.cache_dir}: no embedding cache here (no {MANIFEST})")
        m = json.loads(manifest.read_text())
        if m.get("count") != len(base):
            raise SegAnyError(
                f"{self.cache_dir}: the cache holds {m.get('count')} embeddings, the dataset has {len(base)} images"
            )
        if fingerprint is not None and m.get("fingerprint") != fingerprint:
            raise SegAnyError(f"{self.cache_dir}: the cache was made for other encoder weights or data")
        self.shape = tuple(m.get("shape", ()))

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:  # un-augmented: nothing changes between epochs
        pass

    def embedding(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(_file(self.cache_dir, index)))["embedding"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        item.pop("image", None)
        item["embedding"] = self.embedding(index)
        return item
