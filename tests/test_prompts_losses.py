"""Prompt simulation and losses of the SAM training recipe, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segany.errors import SegAnyError
from segany.evaluation.clicks import inner_distance, next_click
from segany.modeling import build_sam, get_config
from segany.predictor import SamPredictor
from segany.training.loader import collate_for_training
from segany.training.losses import (
    LossConfig,
    dice_loss,
    downsample_targets,
    mask_iou,
    sam_mask_loss,
    sigmoid_focal_loss,
)
from segany.training.prompts import (
    MASK_ONLY,
    POINT,
    PROMPT,
    batched_clicker_points,
    clicker_points,
    error_region_points,
    initial_prompts,
    iteration_schedule,
    jitter_boxes,
    masks_to_boxes,
    sample_uniform_points,
)
from segany.training.step import SamTrainStep, StepOptions


def _disk(s: int, cx: int, cy: int, r: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# -- prompts -----------------------------------------------------------------------------------------


def test_first_point_inside_mask_and_not_ignored():
    torch.manual_seed(0)
    s, n = 64, 300
    gt = _disk(s, 30, 25, 12)
    ignore = torch.zeros(s, s, dtype=torch.bool)
    ignore[:, :30] = True  # the left half of the disk is ignored
    gts = gt.expand(n, s, s).clone()
    valid = (~ignore).expand(n, s, s).clone()
    p = initial_prompts(gts, valid, torch.tensor([[s, s]] * n), num_box=0)
    assert p.num_box == 0 and p.first_point.shape == (n, 2)
    xs, ys = p.first_point[:, 0].long(), p.first_point[:, 1].long()
    assert gt[ys, xs].all() and not ignore[ys, xs].any()
    # uniform over the allowed pixels: many distinct pixels get picked
    assert len({(int(x), int(y)) for x, y in zip(xs, ys)}) > 100
    # a mask that is entirely ignored still gets a point on the mask
    q = initial_prompts(gt[None], torch.zeros(1, s, s, dtype=torch.bool), torch.tensor([[s, s]]), num_box=0)
    x, y = q.first_point[0].long()
    assert gt[y, x]


def test_sample_uniform_points_empty_and_distribution():
    torch.manual_seed(1)
    region = torch.zeros(2, 4, 4, dtype=torch.bool)
    region[0, 1, 2] = region[0, 3, 0] = True
    coords, found = sample_uniform_points(region.repeat(2000, 1, 1)[::1])
    assert found[0::2].all() and not found[1::2].any()
    assert (coords[1::2] == 0).all()
    got = coords[0::2].tolist()
    assert set(map(tuple, got)) == {(2.0, 1.0), (0.0, 3.0)}
    frac = sum(1 for c in got if c == [2.0, 1.0]) / len(got)
    assert 0.45 < frac < 0.55


def test_error_region_points_labels():
    torch.manual_seed(2)
    s, n = 48, 400
    gt = torch.zeros(s, s, dtype=torch.bool)
    gt[10:30, 10:30] = True
    pred = torch.zeros(s, s, dtype=torch.bool)
    pred[10:30, 20:40] = True  # FN: x 10..19, FP: x 30..39 (rows 10..29)
    ignore = torch.zeros(s, s, dtype=torch.bool)
    ignore[10:15] = True
    valid = ~ignore
    coords, labels = error_region_points(pred.expand(n, s, s), gt.expand(n, s, s), valid.expand(n, s, s))
    xs, ys = coords[:, 0].long(), coords[:, 1].long()
    fn = gt & ~pred
    fp = pred & ~gt
    assert (labels >= 0).all()
    assert fn[ys, xs][labels == 1].all() and fp[ys, xs][labels == 0].all()
    assert not ignore[ys, xs].any()
    assert 0.3 < (labels == 1).float().mean() < 0.7  # both regions are the same size
    # a perfect prediction: a padding point
    c2, l2 = error_region_points(gt[None], gt[None], valid[None])
    assert l2.tolist() == [-1] and c2.tolist() == [[0.0, 0.0]]


def test_clicker_points_are_the_evaluation_clickers_on_the_cpu():
    s = 40
    gt = torch.stack([_disk(s, 12, 14, 8), _disk(s, 25, 25, 10), _disk(s, 20, 20, 6)])
    pred = torch.stack([torch.zeros(s, s, dtype=torch.bool), _disk(s, 25, 25, 14), _disk(s, 20, 20, 6)])
    valid = torch.ones_like(gt)
    valid[0, :, :12] = False  # the left half of the first object is ignored
    coords, labels = clicker_points(pred, gt, valid)
    for i in range(2):
        click = next_click(gt[i].numpy(), pred[i].numpy(), (~valid[i]).numpy())
        assert (int(coords[i, 0]), int(coords[i, 1])) == (click.x, click.y)
        assert int(labels[i]) == (1 if click.is_positive else 0)
    assert int(labels[2]) == -1 and coords[2].abs().sum() == 0  # nothing to correct: a padding point


@pytest.mark.parametrize("s", [40, 512])
def test_batched_clicker_points_follow_the_evaluation_clicker(s):
    k = s / 40  # the same scenes at 40 px (exact grid) and 512 px (coarse grid + thin-region fallback)
    gt = torch.stack(
        [_disk(s, 12 * k, 14 * k, 8 * k), _disk(s, 25 * k, 25 * k, 10 * k), _disk(s, 20 * k, 20 * k, 6 * k)]
    )
    pred = torch.stack([torch.zeros(s, s, dtype=torch.bool), _disk(s, 25 * k, 25 * k, 14 * k), gt[2]])
    thin = torch.zeros(s, s, dtype=torch.bool)
    thin[s // 2 : s // 2 + 2, 5:-5] = True  # a 2-pixel-wide object: no whole cell of the coarse grid
    gt, pred = torch.cat([gt, thin[None]]), torch.cat([pred, torch.zeros(1, s, s, dtype=torch.bool)])
    valid = torch.ones_like(gt)
    valid[0, :, : int(12 * k)] = False  # the left half of the first object is ignored
    coords, labels = batched_clicker_points(pred, gt, valid)
    for i in (0, 1, 3):
        g, p, keep = gt[i].numpy(), pred[i].numpy(), valid[i].numpy()
        click = next_click(g, p, ~keep)
        assert int(labels[i]) == (1 if click.is_positive else 0)
        region = (g & ~p if click.is_positive else ~g & p) & keep
        depth = inner_distance(region)
        x, y = int(coords[i, 0]), int(coords[i, 1])
        assert region[y, x]  # inside the error it corrects, never in ignored pixels
        # chessboard depth: the point reaches at least 1/sqrt(2) of the deepest pixel's Euclidean depth
        assert depth[y, x] >= depth.max() / 2**0.5 - 1.0
    assert int(labels[1]) == 0  # the spill ring is the largest error: a negative click in it
    assert int(labels[2]) == -1 and coords[2].abs().sum() == 0  # nothing to correct: a padding point


def test_masks_to_boxes():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    assert masks_to_boxes(m).tolist() == [[3.0, 2.0, 8.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


def test_box_noise_bounded_by_20px_and_scaled_by_side():
    torch.manual_seed(3)
    n = 4000
    big = torch.tensor([[50.0, 60.0, 950.0, 900.0]]).repeat(n, 1)  # sides 900 / 840: std 90 / 84, capped
    lim = torch.tensor([[1024, 1024]]).repeat(n, 1)
    out = jitter_boxes(big, lim, 0.1, 20.0)
    d = out - big
    assert d.abs().max() <= 20.0 + 1e-4
    assert d.abs().max() > 19.0  # the cap is actually reached
    small = torch.tensor([[500.0, 500.0, 550.0, 530.0]]).repeat(n, 1)  # sides 50 / 30: std 5 / 3
    d = jitter_boxes(small, lim, 0.1, 20.0) - small
    assert abs(float(d[:, 0].std()) - 5.0) < 0.4 and abs(float(d[:, 1].std()) - 3.0) < 0.3
    # clipped to the content and ordered
    edge = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(n, 1)
    e = jitter_boxes(edge, torch.tensor([[100, 80]]).repeat(n, 1), 1.0, 20.0)
    assert (e >= 0).all() and (e[:, 2] <= 79).all() and (e[:, 3] <= 99).all()
    assert (e[:, 0] <= e[:, 2]).all() and (e[:, 1] <= e[:, 3]).all()


def test_initial_boxes_from_masks():
    torch.manual_seed(4)
    s = 64
    gt = torch.zeros(3, s, s, dtype=torch.bool)
    gt[:, 10:20, 30:50] = True
    p = initial_prompts(gt, torch.ones_like(gt), torch.tensor([[s, s]] * 3), num_box=2, box_noise_std=0.0)
    assert p.boxes.tolist() == [[30.0, 10.0, 49.0, 19.0]] * 2
    assert p.first_point.shape == (1, 2)


def test_iteration_schedule_paper_layout():
    g = torch.Generator().manual_seed(0)
    positions = set()
    for _ in range(50):
        sch = iteration_schedule(11, generator=g)
        assert len(sch) == 11 and sch[0] == PROMPT and sch[-1] == MASK_ONLY
        assert sch.count(POINT) == 8 and sch.count(MASK_ONLY) == 2
        positions.add(sch.index(MASK_ONLY))
    assert len(positions) > 3  # the inserted mask-only iteration moves around
    assert iteration_schedule(3) == [PROMPT, POINT, MASK_ONLY]
    assert iteration_schedule(2) == [PROMPT, POINT]
    assert iteration_schedule(1) == [PROMPT]
    assert iteration_schedule(4, 0) == [PROMPT, POINT, POINT, POINT]
    with pytest.raises(ValueError):
        iteration_schedule(3, 3)


# -- losses ------------------------------------------------------------------------------------------


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_focal_dice_iou_against_hand_computation():
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])  # 1 x 2 x 2
    gt = torch.tensor([[[True, False], [False, True]]])
    valid = torch.ones_like(gt)
    x = logits.numpy()[0].ravel()
    t = gt.numpy()[0].ravel().astype(float)
    p = _np_sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = 0.25 * t + 0.75 * (1 - t)
    focal = float(np.mean(a_t * ce * (1 - p_t) ** 2))
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert sigmoid_focal_loss(logits, gt, valid).item() == pytest.approx(focal, rel=1e-5)
    assert dice_loss(logits, gt, valid).item() == pytest.approx(dice, rel=1e-5)
    # prediction {(0,0), (1,0)} vs gt {(0,0), (1,1)}: IoU 1/3
    assert mask_iou(logits, gt, valid).item() == pytest.approx(1 / 3)
    out = sam_mask_loss(logits[:, None], torch.tensor([[0.5]]), gt, valid)
    mse = (0.5 - 1 / 3) ** 2
    assert out["iou_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out["loss"].item() == pytest.approx(20 * focal + dice + mse, rel=1e-5)


def test_loss_picks_best_of_three():
    s = 16
    gt = torch.zeros(2, s, s, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    valid = torch.ones_like(gt)
    good = torch.where(gt, 8.0, -8.0)
    bad = -good
    meh = torch.full_like(good, -1.0)
    logits = torch.stack([torch.stack([bad[0], meh[0], good[0]]), torch.stack([good[1], bad[1], meh[1]])])
    iou_pred = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.0, 0.3]])
    out = sam_mask_loss(logits, iou_pred, gt, valid)
    assert out["best"].tolist() == [2, 0]
    single = sam_mask_loss(good[:1, None], iou_pred[:1, 2:], gt[:1], valid[:1], LossConfig(iou_loss_on="best"))
    per_out = 20 * sigmoid_focal_loss(logits, gt, valid) + dice_loss(logits, gt, valid)
    assert out["focal"][0].item() == pytest.approx(single["focal"].item())
    assert (out["loss"] - out["iou_mse"]).tolist() == pytest.approx(per_out.min(dim=1).values.tolist())
    # "all": the IoU head is trained on every output
    actual = mask_iou(logits, gt, valid)
    assert out["iou_mse"].tolist() == pytest.approx(((iou_pred - actual) ** 2).mean(dim=1).tolist())
    # gradient flows only into the best output
    lg = logits.clone().requires_grad_(True)
    sam_mask_loss(lg, iou_pred, gt, valid)["loss"].sum().backward()
    assert lg.grad[0, 2].abs().sum() > 0 and lg.grad[0, :2].abs().sum() == 0


def test_iou_rank_trains_the_choice_among_three():
    """iou_rank_weight: a cross-entropy of the predicted IoUs (/ IOU_RANK_TEMPERATURE) against the truly best
    mask, so predict()'s pick moves towards it; nothing for a single output, and off by default."""
    from segany.training.losses import IOU_RANK_TEMPERATURE

    s = 16
    gt = torch.zeros(1, s, s, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    valid = torch.ones_like(gt)
    good = torch.where(gt, 8.0, -8.0)
    logits = torch.stack([-good, torch.full_like(good, -1.0), good], dim=1)  # 1 x 3: the last is best
    iou_pred = torch.tensor([[0.6, 0.5, 0.4]], requires_grad=True)  # the head prefers the worst
    cfg = LossConfig(iou_rank_weight=2.0)
    out = sam_mask_loss(logits, iou_pred, gt, valid, cfg)
    want = torch.nn.functional.cross_entropy(iou_pred.detach() / IOU_RANK_TEMPERATURE, torch.tensor([2]))
    assert out["iou_rank"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        (sam_mask_loss(logits, iou_pred, gt, valid)["loss"] + 2.0 * want).item(), rel=1e-5
    )
    out["iou_rank"].sum().backward()
    assert iou_pred.grad[0, 2] < 0 < iou_pred.grad[0, 0]  # a step raises the best mask's score
    single = sam_mask_loss(logits[:, 2:], iou_pred[:, 2:], gt, valid, cfg)
    assert single["iou_rank"].item() == 0


def test_ignore_pixels_excluded_from_every_term():
    torch.manual_seed(5)
    s = 12
    gt = torch.zeros(3, s, s, dtype=torch.bool)
    gt[:, 2:7, 3:9] = True
    valid = torch.ones_like(gt)
    valid[:, :, 8:] = False  # ignore the right part (including a bit of the object)
    logits = torch.randn(3, 1, s, s, requires_grad=True)
    iou_pred = torch.rand(3, 1)
    a = sam_mask_loss(logits, iou_pred, gt, valid)
    changed = logits.detach().clone()
    changed[..., 8:] = torch.randn_like(changed[..., 8:]) * 10
    gt2 = gt.clone()
    gt2[:, :, 8:] = ~gt2[:, :, 8:]
    b = sam_mask_loss(changed, iou_pred, gt2, valid)
    for k in ("loss", "focal", "dice", "iou_mse", "iou"):
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    a["loss"].sum().backward()
    assert logits.grad[..., 8:].abs().sum() == 0
    assert logits.grad[..., :8].abs().sum() > 0


def test_downsample_targets_area():
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, :4, :3] = True  # the 2x2 cells: (0,0) full, (0,1) half -> not > 0.5
    valid = torch.ones_like(gt)
    valid[0, 4:, 4:6] = False
    g, v = downsample_targets(gt, valid, (4, 4))
    assert g[0].tolist()[0] == [True, False, False, False] and g[0].tolist()[1] == [True, False, False, False]
    assert not v[0, 2, 2] and v[0, 2, 1] and v[0, 2, 3]


# -- the step sees prompts exactly as the predictor does ------------------------------------------------


def test_training_step_matches_predictor():
    """Iteration 0 of the training step == SamPredictor with the same point / box on the same image.

    Checks the whole alignment: normalisation + padding of the encoder input, coordinates, the token
    layout of point-first and box-first prompts, and the multimask outputs.
    """
    torch.manual_seed(6)
    model = build_sam(get_config("tiny_test")).eval()
    s = model.image_size
    h, w = 96, s  # a padded image: content 96 x 128
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    gt = torch.zeros(4, s, s, dtype=torch.bool)
    gt[0, 20:50, 30:70] = True
    gt[1, 60:90, 10:40] = True
    gt[2, 5:30, 90:120] = True
    gt[3, 40:80, 80:100] = True
    padded = np.zeros((s, s, 3), np.uint8)
    padded[:h, :w] = image
    item = {
        "image": torch.from_numpy(padded.transpose(2, 0, 1).copy()),
        "masks": gt,
        "mask_valid": torch.ones(4, dtype=torch.bool),
        "ignore": torch.zeros(s, s, dtype=torch.bool),
        "valid_hw": torch.tensor([h, w]),
    }
    step = SamTrainStep(model, StepOptions(num_iterations=1, box_noise_std=0.0)).eval()
    captured = {}
    orig = model.mask_decoder.predict_masks

    def spy(*a, **k):
        out = orig(*a, **k)
        captured["low_res"] = out[0]  # all 4 outputs: single, then the 3 multimask ones
        return out

    model.mask_decoder.predict_masks = spy
    try:
        torch.manual_seed(123)
        with torch.no_grad():
            step(collate_for_training([item]))
    finally:
        model.mask_decoder.predict_masks = orig
    # replay the step's draws: mask order, number of box rows, then the prompts themselves
    torch.manual_seed(123)
    perm = torch.randperm(4)
    num_box = int((torch.rand(4) < 0.5).sum())
    gt_p = gt[perm]
    content = torch.zeros(s, s, dtype=torch.bool)
    content[:h, :w] = True
    prompts = initial_prompts(gt_p, content.expand(4, s, s), torch.tensor([[h, w]] * 4), num_box, 0.0, 20.0)
    pred = SamPredictor(model)
    pred.set_image(image)
    kinds = set()
    for row in range(4):
        if row < num_box:  # a box trains the single-output token, as predict(box) uses it
            _, _, lr = pred.predict(box=prompts.boxes[row].numpy(), multimask_output=False)
            got = captured["low_res"][row, :1]
            kinds.add("box")
        else:
            pt = prompts.first_point[row - num_box].numpy()[None]
            _, _, lr = pred.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=True)
            got = captured["low_res"][row, 1:]
            kinds.add("point")
        assert np.allclose(lr, got.numpy(), atol=1e-4), row
    assert kinds == {"box", "point"}  # seed 123 draws both kinds


def test_loss_is_finite_for_empty_gt():
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    out = sam_mask_loss(torch.randn(1, 3, 8, 8), torch.rand(1, 3), gt, torch.ones_like(gt))
    assert all(math.isfinite(float(v.float().sum())) for v in out.values())


def _random_image_item(size: int, rects: list[tuple[int, int, int, int]], num_masks: int) -> dict[str, torch.Tensor]:
    """A training item: a random ``size`` x ``size`` image, ``num_masks`` masks of which the first are the
    rectangles ``(y0, y1, x0, x1)`` and valid, the rest empty and invalid."""
    gt = torch.zeros(num_masks, size, size, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        gt[i, y0:y1, x0:x1] = True
    return {
        "image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8),
        "masks": gt,
        "mask_valid": torch.arange(num_masks) < len(rects),
        "ignore": torch.zeros(size, size, dtype=torch.bool),
        "valid_hw": torch.tensor([size, size]),
    }


def test_padding_masks_do_not_count():
    """Weight-0 padding rows (collate's pad_to_multiple) change nothing, whatever they contain."""
    torch.manual_seed(7)
    model = build_sam(get_config("tiny_test"))
    item = _random_image_item(model.image_size, [(10, 40, 10, 40), (60, 100, 50, 90)], num_masks=3)
    batch = collate_for_training([item], pad_to_multiple=8)
    assert batch["gt_masks"].shape[0] == 8 and batch["mask_weight"].sum() == 2
    step = SamTrainStep(model, StepOptions(num_iterations=3))
    torch.manual_seed(0)
    a = step(batch)
    junk = dict(batch)
    junk["gt_masks"] = batch["gt_masks"].clone()
    junk["gt_masks"][2:, 30:90, 30:90] = True
    torch.manual_seed(0)
    b = step(junk)
    for k in a:
        assert torch.allclose(a[k], b[k]), k


def test_free_clicks_are_decoded_without_gradient_before_the_trained_iterations():
    """max_free_clicks: 0..N corrective clicks with no gradient; the trained iterations then see them."""
    torch.manual_seed(8)
    model = build_sam(get_config("tiny_test"))
    item = _random_image_item(model.image_size, [(10, 60, 10, 50), (70, 110, 60, 120)], num_masks=2)
    batch = collate_for_training([item])
    calls = []
    orig = model.mask_decoder.forward

    def spy(emb, pe, sparse, dense, multimask_output):
        calls.append((torch.is_grad_enabled(), sparse.shape[1]))
        return orig(emb, pe, sparse, dense, multimask_output)

    model.mask_decoder.forward = spy
    seen = set()
    try:
        for seed in range(12):
            calls.clear()
            step = SamTrainStep(model, StepOptions(num_iterations=3, num_mask_only_iterations=0, max_free_clicks=2))
            torch.manual_seed(seed)
            out = step(batch)
            out["loss"].backward()
            free = [c for c in calls if not c[0]]
            trained = [c for c in calls if c[0]]
            assert len(trained) == 2 and 0 <= len(free) <= 2
            # each free click adds one token before the trained point iterations
            tokens = [t for _, t in calls]
            assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
            assert trained[0][1] == (free[-1][1] if free else trained[0][1] - 1) + 1
            seen.add(len(free))
    finally:
        model.mask_decoder.forward = orig
    assert seen == {0, 1, 2}
    # without the option: no decoder call without gradient
    calls.clear()
    model.mask_decoder.forward = spy
    try:
        SamTrainStep(model, StepOptions(num_iterations=3, num_mask_only_iterations=0))(batch)
    finally:
        model.mask_decoder.forward = orig
    assert all(g for g, _ in calls) and len(calls) == 2


@pytest.mark.parametrize("resolution", ["low_res", "2x", "full"])
def test_the_mask_loss_compares_at_the_configured_resolution(monkeypatch, resolution):
    """low_res: the decoder's grid against the area-downsampled gt; 2x: logits upsampled to twice the grid;
    full: logits upsampled to the input against the gt itself."""
    import segany.training.step as step_module
    from segany.training.config import TrainConfig
    from segany.training.losses import loss_side

    torch.manual_seed(8)
    model = build_sam(get_config("tiny_test"))
    s, low = model.image_size, 4 * model.prompt_encoder.image_embedding_size[0]
    side = {"low_res": low, "2x": 2 * low, "full": s}[resolution]
    assert loss_side(resolution, low, s) == side and loss_side("64x", low, s) == s  # never above the input
    item = _random_image_item(s, [(10, 40, 10, 40), (60, 100, 50, 90)], num_masks=2)
    seen = []
    real = step_module.sam_mask_loss

    def spy(logits, iou_pred, gt, valid, cfg):
        seen.append((tuple(logits.shape[-2:]), tuple(gt.shape[-2:]), gt.float().mean().item()))
        return real(logits, iou_pred, gt, valid, cfg)

    monkeypatch.setattr(step_module, "sam_mask_loss", spy)
    torch.manual_seed(0)
    out = SamTrainStep(model, StepOptions(num_iterations=2, loss_resolution=resolution))(collate_for_training([item]))
    assert torch.isfinite(out["loss"])
    assert [shape for shape, _, _ in seen] == [(side, side)] * 2 and all(g == (side, side) for _, g, _ in seen)
    area = (30 * 30 + 40 * 40) / (2 * s * s)  # the rectangles' share of the image, kept at every resolution
    assert all(abs(frac - area) < 0.02 for _, _, frac in seen)
    TrainConfig(loss_resolution=resolution)
    for bad in ("half", "0x", "x", "2.5x"):
        with pytest.raises(SegAnyError, match="loss_resolution"):
            TrainConfig(loss_resolution=bad)
