"""The training pipeline: config, optimiser, data plumbing, a real (tiny) training run, resume, cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.checkpoint import load_model
from segany.errors import SegAnyError
from segany.modeling import SamConfig, build_sam, get_config
from segany.training.config import TrainConfig
from segany.training.distributed import weights_sha256
from segany.training.loader import InfiniteDistributedSampler, collate_for_training
from segany.training.loop import Every, TrainLoop
from segany.training.optim import (
    build_cosine_scheduler,
    build_optimizer,
    build_scheduler,
    encoder_layer_id,
    lr_factor,
    no_weight_decay_names,
    param_groups,
    warmup_cosine_factor,
)
from segany.training.train import train_main
from segany.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def make_bright_folder(root: Path, n: int, seed: int, size: int = 128) -> Path:
    """A label-map folder of ``n`` dark ``size``-pixel images with 1-3 bright disks / rectangles."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        img = np.full((size, size, 3), 20, np.uint8)
        lab = np.zeros((size, size), np.uint8)
        for k in range(1, int(rng.integers(1, 4)) + 1):
            for _ in range(20):
                r = int(rng.integers(12, 28))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                if rng.random() < 0.5:
                    m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
                else:
                    m = (abs(xx - cx) <= r) & (abs(yy - cy) <= int(r * rng.uniform(0.5, 1)))
                if not (m & (lab > 0)).any():
                    lab[m] = k
                    img[m] = rng.integers(150, 256, 3)
                    break
        Image.fromarray(img).save(root / "images" / f"im{i:03d}.png")
        Image.fromarray(lab).save(root / "masks" / f"im{i:03d}.png")
    return root


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    train_root = make_bright_folder(tmp_path / "train", 4, seed=0)
    val_root = make_bright_folder(tmp_path / "val", 3, seed=1)
    base = dict(
        out_dir=str(tmp_path / "run"),
        model="tiny_test",
        train_data=[{"type": "labelmap", "root": str(train_root)}],
        val_data=[{"type": "labelmap", "root": str(val_root)}],
        augment=False,
        batch_size=2,
        max_masks=4,
        num_workers=0,
        num_threads=1,
        num_iterations=3,
        max_steps=10,
        warmup_steps=2,
        lr=3e-3,
        weight_decay=0.0,
        log_every=1,
        val_every=0,
        val_at_start=False,
        ckpt_every=0,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# -- config ------------------------------------------------------------------------------------------


def test_config_yaml_roundtrip_and_errors(tmp_path):
    cfg = TrainConfig(max_steps=7, lr_decay_at=[0.5], train_data=[{"type": "synthetic", "n": 3}])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(p) == cfg
    assert TrainConfig.from_yaml(p, {"max_steps": 9}).max_steps == 9
    p.write_text("max_stpes: 3\n")
    with pytest.raises(SegAnyError, match="max_stpes"):
        TrainConfig.from_yaml(p)
    p.write_text("# nothing set\n")
    with pytest.raises(SegAnyError, match="config file is empty"):
        TrainConfig.from_yaml(p)
    with pytest.raises(SegAnyError, match="loss_resolution"):
        TrainConfig(loss_resolution="half")
    with pytest.raises(SegAnyError, match="freeze_image_encoder"):
        TrainConfig(cache_embeddings=True)
    with pytest.raises(SegAnyError, match="type"):
        TrainConfig(train_data=[{"root": "x"}])


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "finetune_decoder.yaml"])
def test_example_configs_load(name):
    cfg = TrainConfig.from_yaml(REPO / "configs" / name)
    assert cfg.max_steps > 0


def test_text_options_load_like_training_options(tmp_path):
    """The text head's options go through the same loader: numbers from strings, typos and bad lists named."""
    from segany.training.text_train import TextTrainConfig

    cfg = TextTrainConfig.from_yaml(REPO / "configs" / "text_default.yaml", {"steps": "7"})
    assert cfg.steps == 7 and isinstance(cfg.lr, float) and len(cfg.data_weights) == len(cfg.train_data)
    p = tmp_path / "t.yaml"
    p.write_text("train_data: [{type: synthetic, n: 2}]\nlr: 1e-3\n")
    assert TextTrainConfig.from_yaml(p).lr == 1e-3  # YAML reads 1e-3 as a string
    p.write_text("train_data: [{type: synthetic, n: 2}]\nstesp: 3\n")
    with pytest.raises(SegAnyError, match=r"t\.yaml: unknown training options: stesp"):
        TextTrainConfig.from_yaml(p)
    p.write_text("train_data: [{type: synthetic, n: 2}]\ndata_weights: [1, 2]\n")
    with pytest.raises(SegAnyError, match="data_weights needs one weight per train_data entry"):
        TextTrainConfig.from_yaml(p)
    p.write_text("steps: 3\n")
    with pytest.raises(SegAnyError, match="train_data is empty"):
        TextTrainConfig.from_yaml(p)
    p.write_text("train_data: [{type: synthetic, n: 2}]\nprecision: fp16\n")
    with pytest.raises(SegAnyError, match="precision must be auto, bf16 or fp32"):
        TextTrainConfig.from_yaml(p)


# -- optimiser ---------------------------------------------------------------------------------------


def test_param_groups_weight_decay_and_layer_decay():
    model = build_sam(get_config("tiny_test"))  # ViT, depth 2
    nd = no_weight_decay_names(model)
    for name, p in model.named_parameters():
        exempt = (
            p.ndim <= 1
            or "pos_embed" in name
            or "rel_pos" in name
            or any(
                k in name
                for k in ("point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token", "mask_tokens")
            )
        )
        assert (name in nd) == exempt, name
    assert "mask_decoder.transformer.layers.0.self_attn.q_proj.weight" not in nd
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    scale = {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert scale[id(named["image_encoder.patch_embed.proj.weight"])] == (0.125, 0.1)
    assert scale[id(named["image_encoder.pos_embed"])] == (0.125, 0.0)
    assert scale[id(named["image_encoder.blocks.0.attn.qkv.weight"])] == (0.25, 0.1)
    assert scale[id(named["image_encoder.blocks.1.mlp.lin1.weight"])] == (0.5, 0.1)
    assert scale[id(named["image_encoder.neck.0.weight"])] == (1.0, 0.1)
    assert scale[id(named["mask_decoder.iou_token.weight"])] == (1.0, 0.0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])
    assert opt.defaults["betas"] == (0.9, 0.999)
    # frozen parts get no group
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    names = {g["name"] for g in param_groups(model, 0.1, 0.5)}
    assert names == {"layer3_decay", "layer3_no_decay"}


def test_tiny_vit_layer_ids():
    enc = build_sam(get_config("vit_t")).image_encoder  # depths (2, 2, 6, 2)
    assert encoder_layer_id("patch_embed.seq.0.c.weight", enc) == 0
    assert encoder_layer_id("layers.0.blocks.0.conv1.c.weight", enc) == 1
    assert encoder_layer_id("layers.0.downsample.conv1.c.weight", enc) == 2
    assert encoder_layer_id("layers.2.blocks.5.attn.qkv.weight", enc) == 10
    assert encoder_layer_id("layers.3.blocks.1.mlp.fc1.weight", enc) == 12
    assert encoder_layer_id("neck.0.weight", enc) == 13


def test_schedule_warmup_then_step_decay():
    f = [lr_factor(s, 100, 10, [0.6, 0.9], 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == 1.0
    assert f[10] == f[59] == 1.0 and f[60] == pytest.approx(0.1) and f[90] == pytest.approx(0.01)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, 100, 10, [0.6, 0.9], 0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(f)


def test_cosine_schedule_restarts_at_a_step_without_saved_state():
    total, warmup = 20, 4
    f = [warmup_cosine_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.25) and f[3] == 1.0 and f[4] == 1.0
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a > b for a, b in zip(f[4:], f[5:]))

    def lrs(start: int, opt_state=None) -> list[float]:
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=2.0)
        if opt_state is not None:
            opt.load_state_dict(opt_state)  # holds the last lr it used, not the base lr
        sched = build_cosine_scheduler(opt, 2.0, total, warmup, start_step=start)
        out = []
        for _ in range(start, total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    straight = lrs(0)
    assert straight == pytest.approx([2.0 * v for v in f])
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.123)
    assert lrs(7, opt.state_dict()) == straight[7:]


def test_train_loop_logs_windows_and_runs_actions_between_steps():
    """The shared loop: log windows (means, last step, lr), periodic actions except on the last step, resume."""
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    model = torch.nn.Linear(3, 1)

    def forward(batch, step):
        loss = ((model(batch[0])[:, 0] - batch[1]) ** 2).mean()
        return {"loss": loss, "step": torch.tensor(float(step))}

    def run(start: int, max_steps: int) -> tuple[int, list, list]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        windows, actions = [], []
        end = TrainLoop(
            next_batch=lambda step: (x, y),
            forward=forward,
            optimizer=opt,
            scheduler=torch.optim.lr_scheduler.StepLR(opt, 4, 0.5),
            params=list(model.parameters()),
            max_steps=max_steps,
            log_every=3,
            on_log=windows.append,
            grad_clip=10.0,
            actions=[Every(2, actions.append), Every(0, actions.append)],
        ).run(start)
        return end, windows, actions

    end, windows, actions = run(0, 7)
    assert end == 7 and actions == [2, 4, 6]
    assert [(w.step, w.steps) for w in windows] == [(3, 3), (6, 3), (7, 1)]
    assert windows[0].means["step"] == 1.0 and float(windows[1].last["step"]) == 5.0  # 0-based step indices
    assert [w.lr for w in windows] == [0.1, 0.05, 0.05] and "grad_norm" in windows[0].means
    assert windows[-1].means["loss"] < windows[0].means["loss"]
    end, windows, actions = run(5, 7)  # resumed: steps 6 and 7 only
    assert end == 7 and actions == [6] and [(w.step, w.steps) for w in windows] == [(6, 1), (7, 1)]


# -- data plumbing -----------------------------------------------------------------------------------


def test_collate_packs_valid_masks():
    s = 16

    def item(valid):
        m = torch.zeros(3, s, s, dtype=torch.bool)
        for i, v in enumerate(valid):
            if v:
                m[i, i : i + 4, :4] = True
        return {
            "image": torch.zeros(3, s, s, dtype=torch.uint8),
            "masks": m,
            "mask_valid": torch.tensor(valid),
            "ignore": torch.zeros(s, s, dtype=torch.bool),
            "valid_hw": torch.tensor([s, s]),
            "names": [None] * 3,
            "source": "x",
        }

    b = collate_for_training([item([True, False, False]), item([True, True, False])])
    assert b["gt_masks"].shape == (3, s, s)
    assert b["mask_image"].tolist() == [0, 1, 1]
    assert b["mask_weight"].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(b["gt_masks"][2], item([True, True, False])["masks"][1])
    empty = collate_for_training([item([False, False, False])])
    assert empty["gt_masks"].shape == (1, s, s) and empty["mask_weight"].tolist() == [0.0]
    padded = collate_for_training([item([True, False, False]), item([True, True, False])], pad_to_multiple=4)
    assert padded["gt_masks"].shape == (4, s, s) and padded["mask_weight"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.equal(padded["gt_masks"][:3], b["gt_masks"]) and not padded["gt_masks"][3].any()


def test_infinite_sampler_shards_and_resumes():
    a = InfiniteDistributedSampler(5, 2, 0, seed=3)
    b = InfiniteDistributedSampler(5, 2, 1, seed=3)
    ia, ib = iter(a), iter(b)
    ea = [next(ia) for _ in range(3)]
    eb = [next(ib) for _ in range(3)]
    assert sorted(set(ea) | set(eb)) == [0, 1, 2, 3, 4]  # epoch 0 covered (one index padded)
    nxt = [next(ia) for _ in range(3)]
    assert all(5 <= v < 10 for v in nxt)  # epoch 1 uses virtual indices 5..9
    c = iter(InfiniteDistributedSampler(5, 2, 0, seed=3, start=4))
    assert [next(c) for _ in range(2)] == nxt[1:3]


# -- real training -----------------------------------------------------------------------------------


def test_tiny_training_learns(tmp_path):
    """A few dozen steps on bright shapes: the loss falls and validation IoU rises (real numbers)."""
    cfg = tiny_cfg(tmp_path, max_steps=40, focal_weight=1.0, val_at_start=True, val_every=20, lr_decay_at=[0.9])
    res = train(cfg)
    train_recs = [r for r in res.history if r["kind"] == "train"]
    val_recs = [r for r in res.history if r["kind"] == "val"]
    losses = [r["loss"] for r in train_recs]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert [r["step"] for r in val_recs] == [0, 20, 40]
    before, after = val_recs[0], val_recs[-1]
    assert after["val_mean_miou"] > before["val_mean_miou"] + 0.1
    assert after["val_click_miou1"] > before["val_click_miou1"]
    assert after["val_loss"] < before["val_loss"]
    out = Path(cfg.out_dir)
    for f in (
        "last.pt",
        "metrics.jsonl",
        "training.png",
        "best.safetensors",
        "final.safetensors",
        "summary.json",
        "config.yaml",
    ):
        assert (out / f).is_file(), f
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert {"step", "loss", "focal", "dice", "iou_mse", "lr", "steps_per_s", "images_per_s"} <= set(rec)
    final = load_model(out / "final.safetensors")
    assert weights_sha256(final) == weights_sha256(res.model.cpu())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] in (20, 40) and summary["steps"] == 40


def test_resume_is_exact(tmp_path):
    """3 steps + resume to 6 == 6 straight steps (model, optimizer, schedule, data order, prompts)."""
    # no step decay: the schedule must not depend on max_steps for the 3-step run to be a prefix
    from segany.checkpoint import save_model

    torch.manual_seed(0)
    start = tmp_path / "start.safetensors"  # a decoder head count that the weights' shapes do not tell
    save_model(build_sam(SamConfig.from_dict({**get_config("tiny_test").to_dict(), "decoder_num_heads": 4})), start)
    kw = dict(grad_clip=1.0, augment={"scale_min": 0.5, "scale_max": 1.5}, lr_decay_at=[], warmup_steps=4,
              checkpoint=str(start))
    full = train(tiny_cfg(tmp_path, max_steps=6, out_dir=str(tmp_path / "full"), **kw))
    part = tmp_path / "part"
    train(tiny_cfg(tmp_path, max_steps=3, out_dir=str(part), **kw))
    resumed = train(tiny_cfg(tmp_path, max_steps=6, out_dir=str(part), resume=True, **kw))
    assert resumed.step == 6
    assert weights_sha256(resumed.model) == weights_sha256(full.model)
    steps = [r["step"] for r in resumed.history if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    a = [r["loss"] for r in full.history if r["kind"] == "train"]
    b = [r["loss"] for r in resumed.history if r["kind"] == "train"]
    assert a == pytest.approx(b, rel=1e-6)
    state = torch.load(part / "last.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "rng" in state
    last = load_model(part / "last.pt")  # last.pt carries the architecture, as final.safetensors does
    assert last.config == resumed.model.config and weights_sha256(last) == weights_sha256(resumed.model)


def test_train_main_flags_override_yaml(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, max_steps=2, val_data=[])
    p = tmp_path / "cfg.yaml"
    p.write_text(cfg.to_yaml())
    assert train_main(["--config", str(p), "--max-steps", "3", "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    out = tmp_path / "cli_run"
    assert (
        train_main(["--config", str(p), "--out-dir", str(out), "--num-iterations", "2", "--loss-resolution", "full"])
        == 0
    )
    assert load_model(out / "best.safetensors").image_size == 128
    with pytest.raises(SegAnyError, match="precision"):
        train_main(["--config", str(p), "--precision", "fp8"])


def test_validation_sets_are_interleaved_not_sampled(tmp_path):
    from segany.training.loader import InterleavedDataset, build_datasets

    a = make_bright_folder(tmp_path / "a", 3, seed=2)
    b = make_bright_folder(tmp_path / "b", 1, seed=3)
    cfg = tiny_cfg(tmp_path)
    specs = [{"type": "labelmap", "root": str(a)}, {"type": "labelmap", "root": str(b)}]
    val = build_datasets(specs, cfg, 128, None, 0, mix=False)
    assert isinstance(val, InterleavedDataset) and len(val) == 4
    assert [val[i]["source"] for i in range(4)] == ["a:im000", "b:im000", "a:im001", "a:im002"]


def test_a_text_head_beside_the_checkpoint_stays_out_of_training(tmp_path):
    # load_model attaches `<stem>_text.safetensors` when it lies beside the model file (the shipped default
    # has one); the trainer must neither train it nor write it into its checkpoints
    from segany.checkpoint import save_model
    from segany.checkpoint_text import new_text_head, save_text_head
    from segany.training.trainer import build_model

    torch.manual_seed(0)
    start = build_sam(get_config("tiny_test"))
    ckpt = tmp_path / "start.safetensors"
    save_model(start, ckpt)
    save_text_head(new_text_head(start), start, tmp_path / "start_text.safetensors")
    assert load_model(ckpt).text_head is not None
    model = build_model(tiny_cfg(tmp_path, checkpoint=str(ckpt)))
    assert model.text_head is None and not any(k.startswith("text_head.") for k in model.state_dict())
