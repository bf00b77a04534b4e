"""``segany train`` and its torchrun entry point: options from ``--config FILE.yaml`` and flags, then
:func:`segany.training.trainer.train`.

    torchrun --nproc_per_node=N -m segany.training.train --config FILE.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from segany.errors import SegAnyError
from segany.training.config import TrainConfig
from segany.training.run_files import jsonable
from segany.training.trainer import train


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
            json.dumps(jsonable({k: res.summary.get(k) for k in ("steps", "best_metric", "best_value", "best_step")}))
        )
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m segany.training.train --config FILE.yaml
    try:
        sys.exit(train_main(sys.argv[1:]))
    except SegAnyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
