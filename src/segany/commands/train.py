"""``segany train`` (the options are TrainConfig's: ``--config FILE.yaml`` and/or ``--field-name VALUE``) and
``segany train-text``, ``segany train-refiner`` and ``segany train-correction``."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    from segany.training.train import build_arg_parser

    build_arg_parser(p)


def run(args: argparse.Namespace) -> int:
    from segany.training.train import train_main

    return train_main(args)



def _add_head_args(p: argparse.ArgumentParser, options: str, example: str, count: str) -> None:
    """The options of a command that trains a part on a frozen model: a config file, and overrides."""
    p.add_argument("--config", required=True, help=f"YAML of {options} options (see {example})")
    p.add_argument(f"--{count}", type=int, help=f"override the number of {count}")
    p.add_argument("--out-dir", help="override out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _overrides(args: argparse.Namespace, count: str) -> dict:
    return {k: v for k, v in ((count, getattr(args, count)), ("out_dir", args.out_dir)) if v is not None}


def add_text_args(p: argparse.ArgumentParser) -> None:
    _add_head_args(p, "TextTrainConfig", "configs/text_default.yaml", "steps")


def run_text(args: argparse.Namespace) -> int:
    from segany.training.text_train import TextTrainConfig, train_text_head

    path = train_text_head(TextTrainConfig.from_yaml(args.config, _overrides(args, "steps")), progress=not args.quiet)
    print(f"text head: {path}")
    return 0


def add_refiner_args(p: argparse.ArgumentParser) -> None:
    _add_head_args(p, "RefinerTrainConfig", "configs/point_refiner.yaml", "images")


def run_refiner(args: argparse.Namespace) -> int:
    from segany.training.refiner_train import RefinerTrainConfig, train_point_refiner

    config = RefinerTrainConfig.from_yaml(args.config, _overrides(args, "images"))
    path = train_point_refiner(config, progress=not args.quiet)
    print(f"model with its {'second' if config.second else 'point'} refiner: {path}")
    return 0


def add_correction_args(p: argparse.ArgumentParser) -> None:
    _add_head_args(p, "CorrectionTrainConfig", "configs/correction_decoder.yaml", "images")


def run_correction(args: argparse.Namespace) -> int:
    from segany.training.correction_train import CorrectionTrainConfig, train_correction_decoder

    config = CorrectionTrainConfig.from_yaml(args.config, _overrides(args, "images"))
    print(f"model with its new correction decoder: {train_correction_decoder(config, progress=not args.quiet)}")
    return 0
