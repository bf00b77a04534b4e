"""DDP: two CPU processes on gloo (environment as torchrun sets it); both ranks end with equal weights."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from segany.checkpoint import load_model
from segany.training.config import TrainConfig
from segany.training.distributed import weights_sha256

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


def _bright_folder(root: Path, n: int, seed: int, size: int = 128) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        img = np.full((size, size, 3), 20, np.uint8)
        lab = np.zeros((size, size), np.uint8)
        for k in range(1, int(rng.integers(1, 4)) + 1):
            r = int(rng.integers(10, 20))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            m = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & (lab == 0)
            lab[m] = k
            img[m] = rng.integers(150, 256, 3)
        Image.fromarray(img).save(root / "images" / f"im{i:03d}.png")
        Image.fromarray(lab).save(root / "masks" / f"im{i:03d}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dicts: list[dict], result_dir: str) -> None:
    """One DDP rank: the same environment torchrun sets up, then train() each config in turn."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    from segany.training.trainer import train

    try:
        for i, d in enumerate(cfg_dicts):
            res = train(TrainConfig.from_dict(d))
            # each rank writes the hash of its own weights
            Path(result_dir, f"run{i}_rank{rank}.sha256").write_text(weights_sha256(res.model))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _cfg(tmp_path: Path, root: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny_test",
        train_data=[{"type": "labelmap", "root": str(root)}],
        val_data=[],
        augment={"scale_min": 0.7, "scale_max": 1.3},
        batch_size=1,
        max_masks=3,
        num_workers=0,
        num_threads=1,
        num_iterations=3,
        max_steps=4,
        warmup_steps=1,
        lr=1e-3,
        log_every=2,
        ckpt_every=0,
        drop_path_rate=0.1,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_ddp_two_ranks_identical_weights(tmp_path):
    """Two gloo ranks (spawned like torchrun would): the whole model, then frozen encoder + cache."""
    root = _bright_folder(tmp_path / "data", 6, seed=0)
    full = _cfg(tmp_path, root, out_dir=str(tmp_path / "full"))
    cached = _cfg(
        tmp_path,
        root,
        out_dir=str(tmp_path / "cached"),
        freeze_image_encoder=True,
        cache_embeddings=True,
        augment=False,
        drop_path_rate=None,
    )
    res_dir = tmp_path / "hashes"
    res_dir.mkdir()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.start_processes(
            _worker,
            args=(2, _free_port(), [full.to_dict(), cached.to_dict()], str(res_dir)),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old

    for i, cfg in enumerate((full, cached)):
        h0 = (res_dir / f"run{i}_rank0.sha256").read_text()
        h1 = (res_dir / f"run{i}_rank1.sha256").read_text()
        assert h0 == h1, cfg.out_dir
        out = Path(cfg.out_dir)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["weights_sha256_by_rank"] == [h0, h1]
        assert weights_sha256(load_model(out / "final.safetensors")) == h0
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4]
    # it trained: the weights moved away from the (seeded) initialisation
    from segany.training.trainer import build_model

    torch.manual_seed(full.seed)
    assert weights_sha256(build_model(full)) != (res_dir / "run0_rank0.sha256").read_text()
    # the cache was filled half by each rank
    cache = Path(cached.out_dir) / "embeddings"
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert json.loads((cache / "manifest.json").read_text())["count"] == 6
