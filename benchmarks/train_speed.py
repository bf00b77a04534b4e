"""Training throughput of one or more training configs, measured side by side on the same batches.

    python benchmarks/train_speed.py configs/default_model_v1.yaml configs/default_model_v2.yaml \
        [--steps 3] [--threads 1] [--precision bf16 fp32]

For each config (and precision) it builds the model as ``segany train`` does, draws the same augmented
batch of ``batch_size`` images from the config's training data, and times whole optimisation steps
(forward with the simulated interactive prompts, backward, AdamW) round-robin across the configs, so
that a change in the machine's load shows on every row. Prints images/s and masks/s (medians).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup(path: str, precision: str):
    from segany.training.config import TrainConfig
    from segany.training.loader import augment_config, build_datasets, collate_for_training
    from segany.training.optim import build_optimizer
    from segany.training.step import SamTrainStep, StepOptions
    from segany.training.trainer import prepare_model

    cfg = TrainConfig.from_yaml(path)
    model = prepare_model(cfg)  # frozen parts and memory format as the trainer sets them
    data = build_datasets(cfg.train_data, cfg, int(model.image_size), augment_config(cfg.augment), cfg.seed)
    batch = collate_for_training([data[i] for i in range(cfg.batch_size)])
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = SamTrainStep(model, StepOptions.from_config(cfg, dtype), cfg.freeze_image_encoder).train()
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.layer_decay)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        step(batch)["loss"].backward()
        opt.step()

    return run, cfg.batch_size, int(batch["gt_masks"].shape[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="training config files")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for path in args.configs:
        for precision in args.precision:
            run, images, masks = _setup(path, precision)
            run()  # warm-up
            rows[(path, precision)] = (run, images, masks, [])
    for _ in range(args.steps):
        for run, _, _, times in rows.values():
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    print(f"threads {args.threads}, {args.steps} steps each, round-robin")
    for (path, precision), (_, images, masks, times) in rows.items():
        s = statistics.median(times)
        print(
            f"{path} [{precision}]: {s:.2f} s/step, {images / s:.2f} images/s, {masks / s:.1f} masks/s "
            f"({images} images, {masks} masks a step)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
