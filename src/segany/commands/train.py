"""``segany train`` (the options are TrainConfig's: ``--config FILE.yaml`` and/or ``--field-name VALUE``) and
``segany train-text`` and ``segany train-refiner``."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    from segany.training.train import build_arg_parser

    build_arg_parser(p)


def run(args: argparse.Namespace) -> int:
    from segany.training.train import train_main

    return train_main(args)



def add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML of TextTrainConfig options (see configs/text_default.yaml)")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--out-dir", help="override out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run_text(args: argparse.Namespace) -> int:
    from segany.training.text_train import TextTrainConfig, train_text_head

    overrides = {k: v for k, v in (("steps", args.steps), ("out_dir", args.out_dir)) if v is not None}
    path = train_text_head(TextTrainConfig.from_yaml(args.config, overrides), progress=not args.quiet)
    print(f"text head: {path}")
    return 0



def add_refiner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML of RefinerTrainConfig options (configs/point_refiner.yaml)")
    p.add_argument("--images", type=int, help="override the number of training images")
    p.add_argument("--out-dir", help="override out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run_refiner(args: argparse.Namespace) -> int:
    from segany.training.refiner_train import RefinerTrainConfig, train_point_refiner

    overrides = {k: v for k, v in (("images", args.images), ("out_dir", args.out_dir)) if v is not None}
    path = train_point_refiner(RefinerTrainConfig.from_yaml(args.config, overrides), progress=not args.quiet)
    print(f"model with its point refiner: {path}")
    return 0
