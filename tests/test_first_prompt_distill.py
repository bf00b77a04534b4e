"""first_prompt_distill: a decoder stage whose first prompt learns the starting decoder's answers."""

from __future__ import annotations

import json

import pytest
import torch

from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.training.config import TrainConfig
from segany.training.loader import collate_for_training
from segany.training.step import SamTrainStep, StepOptions, first_prompt_teacher
from segany.training.trainer import train
from tests.test_prompts_losses import _random_image_item
from tests.test_training import tiny_cfg


def test_first_prompt_distill_learns_the_teachers_first_answers():
    """first_prompt_distill: the first prompt's targets are a frozen teacher's answers (a run's start): a
    student that answers as the teacher gets no loss and no gradient from the first prompt, one whose
    teacher differs gets both; later prompts still learn the ground truth; the teacher never trains."""
    torch.manual_seed(9)
    model = build_sam(get_config("tiny_test"))
    item = _random_image_item(model.image_size, [(10, 60, 10, 50), (70, 110, 60, 120)], num_masks=2)
    batch = collate_for_training([item])
    teacher = first_prompt_teacher(model)
    step = SamTrainStep(model, StepOptions(num_iterations=1, first_prompt_distill=2.0), teacher=teacher)
    torch.manual_seed(0)
    out = step(batch)
    assert abs(out["distill"].item()) < 1e-6 and abs(out["loss"].item()) < 1e-6
    out["loss"].backward()
    grads = [p.grad for p in model.mask_decoder.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() < 1e-6 for g in grads)
    model.zero_grad()
    with torch.no_grad():
        for p in teacher.iou_prediction_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        teacher.mask_tokens.weight.add_(0.5 * torch.randn_like(teacher.mask_tokens.weight))
    torch.manual_seed(0)
    out = step(batch)
    assert out["distill"].item() > 1e-4
    torch.testing.assert_close(out["loss"], 2.0 * out["distill"])  # one prompt: the distillation alone
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 1e-6 for p in model.mask_decoder.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    two = SamTrainStep(model, StepOptions(num_iterations=2, first_prompt_distill=2.0), teacher=teacher)
    torch.manual_seed(0)
    out2 = two(batch)
    assert out2["loss"].item() > 2.0 * out2["distill"].item() + 1e-4  # the second prompt's ground-truth loss
    with pytest.raises(ValueError, match="teacher"):
        SamTrainStep(model, StepOptions(num_iterations=1, first_prompt_distill=1.0))
    with pytest.raises(ValueError, match="teacher"):
        SamTrainStep(model, StepOptions(num_iterations=1), teacher=teacher)


def test_first_prompt_distill_runs_from_a_checkpoint_and_is_checked(tmp_path):
    """first_prompt_distill: a run from a checkpoint logs the distillation (0 at the first step: the
    student starts as its teacher); the option refuses a negative weight and a run without a checkpoint."""
    from segany.checkpoint import save_model

    torch.manual_seed(0)
    ckpt = tmp_path / "start.safetensors"
    save_model(build_sam(get_config("tiny_test")), ckpt)
    res = train(tiny_cfg(tmp_path, checkpoint=str(ckpt), first_prompt_distill=1.0, max_steps=2, lr=1e-2))
    rows = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    assert len(train_rows) == 2 and abs(train_rows[0]["distill"]) < 1e-6 and train_rows[1]["distill"] > 0
    with pytest.raises(SegAnyError, match="first_prompt_distill"):
        TrainConfig(first_prompt_distill=1.0)
    with pytest.raises(SegAnyError, match="first_prompt_distill"):
        TrainConfig(first_prompt_distill=-1.0, checkpoint=str(ckpt))
