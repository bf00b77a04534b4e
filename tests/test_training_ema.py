"""``ema_decay``: the exported weights are the exponential moving average of every step's weights."""

from __future__ import annotations

import pytest
import torch

from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.training.config import TrainConfig
from segany.training.distributed import weights_sha256
from segany.training.trainer import train
from tests.test_training import tiny_cfg


def _start(tmp_path):
    from segany.checkpoint import save_model

    torch.manual_seed(0)
    path = tmp_path / "start.safetensors"
    save_model(build_sam(get_config("tiny_test")), path)
    return path


def test_ema_is_the_average_of_the_steps(tmp_path):
    """Runs of 1..3 steps give each step's raw weights; the average run's export is their EMA from the start."""
    start = _start(tmp_path)
    kw = dict(checkpoint=str(start), lr_decay_at=[], warmup_steps=1, val_data=[])
    raw = [train(tiny_cfg(tmp_path, max_steps=n, out_dir=str(tmp_path / f"raw{n}"), **kw)).model for n in (1, 2, 3)]
    d = 0.6
    avg = train(tiny_cfg(tmp_path, max_steps=3, out_dir=str(tmp_path / "ema"), ema_decay=d, **kw)).model
    from segany.checkpoint import load_model

    expect = {k: v.clone() for k, v in load_model(str(start)).state_dict().items()}
    for m in raw:
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                expect[k] = d * expect[k] + (1 - d) * v
    got = avg.state_dict()
    moved = 0
    for k, v in expect.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(v, raw[-1].state_dict()[k]))
    assert moved > 10  # the average is not the last step's weights
    # and what final.safetensors holds is the average
    exported = load_model(str(tmp_path / "ema" / "final.safetensors"))
    assert weights_sha256(exported) == weights_sha256(avg)


def test_ema_resume_is_exact(tmp_path):
    start = _start(tmp_path)
    kw = dict(checkpoint=str(start), lr_decay_at=[], warmup_steps=2, ema_decay=0.8, val_data=[])
    full = train(tiny_cfg(tmp_path, max_steps=4, out_dir=str(tmp_path / "full"), **kw))
    part = tmp_path / "part"
    train(tiny_cfg(tmp_path, max_steps=2, out_dir=str(part), **kw))
    resumed = train(tiny_cfg(tmp_path, max_steps=4, out_dir=str(part), resume=True, **kw))
    assert weights_sha256(resumed.model) == weights_sha256(full.model)


def test_ema_decay_is_checked():
    with pytest.raises(SegAnyError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
