"""Train for a wall-clock budget (a lent accelerator's few minutes): a short probe run measures this
machine's steps/s with the real options, then the real run gets the ``max_steps`` that fill what is left
of the budget, so its warm-up and lr decays span the whole run. The final weights (fp16) and the run's
metrics are copied to ``--export``.

    python scripts/timed_train.py --config configs/default_model_v3_h200.yaml --seconds 420 --export $OUT
    python scripts/timed_train.py --config FILE.yaml --seconds 300 --export DIR --lr 3e-4   (segany train's flags)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from segany.errors import SegAnyError
from segany.training.config import TrainConfig
from segany.training.train import build_arg_parser
from segany.training.trainer import train


def probe_rate(metrics: Path) -> float:
    """Steps/s of a probe run: the last logged window (the first one pays for start-up)."""
    rates = [r["steps_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]
    if not rates:
        raise SegAnyError(f"{metrics}: the probe logged no training step (raise --probe-steps)")
    return float(rates[-1])


def profile(cfg: TrainConfig, steps: int, out_dir: Path, report: Path) -> None:
    """Run ``steps`` steps under torch.profiler and write the ops that take the most host and device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir), max_steps=steps)
    begin = time.monotonic()
    with torch_profile(activities=acts) as prof:
        train(cfg)
    table = prof.key_averages()
    parts = [f"{steps} steps (start-up included) in {time.monotonic() - begin:.1f} s"]
    for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if len(acts) > 1 else []):
        parts.append(table.table(sort_by=key, row_limit=30, max_name_column_width=60))
    report.write_text("\n\n".join(parts))
    print(parts[0], flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--seconds", type=float, required=True, help="wall-clock budget, probe included")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--margin", type=float, default=0.85, help="fraction of the measured rate to plan on")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--export", required=True, help="folder for final.safetensors, metrics.jsonl, summary.json")
    p.add_argument("--steps-per-s", type=float, help="a rate measured before: no probe run")
    p.add_argument("--profile-steps", type=int, default=0, help="also profile this many steps (profile.txt)")
    args, rest = p.parse_known_args(argv)
    # the other flags are segany train's option flags (--lr 3e-4, --checkpoint FILE, ...)
    flags = vars(build_arg_parser().parse_args(rest))
    options = {k: v for k, v in flags.items() if v is not None and k not in ("config", "print_config")}
    start = time.monotonic()
    base = TrainConfig.from_yaml(args.config, options)
    out = Path(base.out_dir)
    probe_cfg = dataclasses.replace(
        base,
        out_dir=str(out / "probe"),
        max_steps=args.probe_steps,
        log_every=max(1, args.probe_steps // 2),
        val_data=[],
        ckpt_every=10**9,
    )
    if args.steps_per_s:
        rate = args.steps_per_s
    else:
        train(probe_cfg)
        rate = probe_rate(out / "probe" / "metrics.jsonl")
    export = Path(args.export)
    export.mkdir(parents=True, exist_ok=True)
    if args.profile_steps > 0:
        profile(probe_cfg, args.profile_steps, out / "profile", export / "profile.txt")
    left = args.seconds - (time.monotonic() - start)
    steps = max(args.min_steps, int(rate * args.margin * left))
    print(f"{rate:.2f} steps/s; {left:.0f} s left -> max_steps {steps}", flush=True)
    train(dataclasses.replace(base, max_steps=steps, out_dir=str(out / "run"), export_half=True))
    for name in ("final.safetensors", "metrics.jsonl", "summary.json", "config.yaml"):
        src = out / "run" / name
        if src.exists():
            shutil.copy2(src, export / name)
    print(f"done in {time.monotonic() - start:.0f} s: {steps} steps -> {export}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SegAnyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
